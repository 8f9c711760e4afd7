"""The one module that reads YAML: gateway config and BMS profiles, parsed and checked.

Every problem is collected (not just the first) as a `Problem` naming the file, the key
path, what is wrong and how to fix it, so `check-config` can print them all at once.
Checking a profile against its DBC happens in `normalize.compile_pack`, which reports
through the same `Problem` type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.model import FIELD_BY_NAME, SEVERITIES, Severity

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A checkout (or editable install) has config/ and dbc/ beside the package; a wheel
# installs them under <prefix>/share/bms-gateway (setup.cfg data_files).
_SHARE = Path(sys.prefix) / "share" / "bms-gateway"
_IN_TREE = (PROJECT_ROOT / "config" / "profiles").is_dir()
BUILTIN_PROFILES = PROJECT_ROOT / "config" / "profiles" if _IN_TREE else _SHARE / "profiles"
BUILTIN_DBC = PROJECT_ROOT / "dbc" if _IN_TREE else _SHARE / "dbc"
BUILTIN_CONFIG = PROJECT_ROOT / "config" if _IN_TREE else _SHARE / "config"
TOPIC_SEGMENT_MAX = 64
_SEGMENT_BAD = re.compile(r"[/+#\x00]")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    key: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        end = "" if self.what.endswith((".", "?", "!")) else "."
        return f"{self.file}: {self.key}: {self.what}{end}{fix}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def topic_segment_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if _SEGMENT_BAD.search(value):
        return "must not contain '/', '+', '#' or NUL (it is used as an MQTT topic segment)"
    if len(value) > TOPIC_SEGMENT_MAX:
        return f"is longer than {TOPIC_SEGMENT_MAX} characters"
    return None


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
class SignalRef:
    message: str
    signal: str


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
    # Polling details that poll.py validates (ISO-TP blocks are its own small schema).
    isotp: tuple[dict[str, Any], ...] = ()
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
    # socketcan only: "raw" reads the AF_CAN socket directly (gateway/socketcan.py),
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
class RuleConfig:
    """One gateway rule's settings; `None` disables a limit."""

    code: str
    raise_at: float | None
    clear_at: float | None
    severity: Severity
    debounce_s: float = 0.0
    enabled: bool = True


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
    rules: dict[str, dict[str, Any]]  # raw per-rule overrides, validated in faults
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


# ---------------------------------------------------------------- parsing helpers


class _Reader:
    """Typed access to a YAML mapping that records problems instead of raising."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems

    def bad(self, key: str, what: str, fix: str = "") -> None:
        self.problems.append(Problem(self.file, key, what, fix))

    def mapping(self, obj: Any, key: str) -> dict[str, Any]:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self.bad(key, f"must be a mapping, got {type(obj).__name__}",
                     "write it as `key: value` lines indented under it")
            return {}
        return obj

    def known(self, obj: dict[str, Any], key: str, allowed: set[str]) -> None:
        for k in obj:
            if k not in allowed:
                hint = nearest(str(k), allowed)
                self.bad(f"{key}.{k}" if key else str(k), "unknown key",
                         hint or f"allowed keys: {', '.join(sorted(allowed))}")

    def num(self, obj: dict[str, Any], key: str, name: str, default: float | None,
            lo: float | None = None, hi: float | None = None) -> float | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(f"{key}.{name}" if key else name, f"must be a number, got {v!r}",
                     "write a plain number without quotes, such as 10 or 0.5")
            return default
        if not math.isfinite(v):  # .nan passes every range test; .inf overflows timers
            self.bad(f"{key}.{name}" if key else name, f"must be a finite number, got {v!r}",
                     "write a plain number such as 10 or 0.5")
            return default
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            self.bad(f"{key}.{name}" if key else name, f"{v} is out of range {rng}",
                     f"use a value from {rng.replace('..', ' to ')}")
            return default
        return float(v)

    def int_(self, obj: dict[str, Any], key: str, name: str, default: int | None,
             lo: int | None = None, hi: int | None = None) -> int | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(f"{key}.{name}" if key else name, f"must be a whole number, got {v!r}",
                     "write an integer without quotes, such as 16")
            return default
        if lo is not None and v < lo:
            self.bad(f"{key}.{name}" if key else name, f"must be at least {lo}",
                     f"use a value from {lo} to {hi}" if hi is not None else f"use {lo} or more")
            return default
        if hi is not None and v > hi:
            self.bad(f"{key}.{name}" if key else name, f"{v} is more than the maximum {hi}",
                     f"use a value from {lo if lo is not None else 0} to {hi}")
            return default
        return v

    def str_(self, obj: dict[str, Any], key: str, name: str, default: str | None) -> str | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            self.bad(f"{key}.{name}" if key else name, f"must be text, got {v!r}",
                     "write it as a plain value in quotes, e.g. \"can0\"")
            return default
        return str(v)

    def bool_(self, obj: dict[str, Any], key: str, name: str, default: bool) -> bool:
        v = obj.get(name, default)
        if not isinstance(v, bool):
            self.bad(f"{key}.{name}" if key else name, f"must be true or false, got {v!r}",
                     "write true or false without quotes")
            return default
        return v

    def range_(self, obj: dict[str, Any], key: str, name: str) -> tuple[float, float] | None:
        v = obj.get(name)
        if v is None:
            return None
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                or any(math.isnan(x) for x in v) or v[0] > v[1]):
            self.bad(f"{key}.{name}", f"must be [min, max], got {v!r}", "e.g. valid: [2.0, 4.5]")
            return None
        return float(v[0]), float(v[1])


# Bounds on what one YAML file may cost (configs and profiles are a few kB): the size
# of the file (YAML_MAX_BYTES), and the number of nodes, also once aliases are expanded. A few hundred bytes
# of nested aliases (a "billion laughs") otherwise become 10^8 list items that every
# later step (validation, error messages, logs) walks: minutes and gigabytes.
MAX_YAML_NODES = 100_000
MAX_EXPR_CHARS = 1000  # a profile's `expr:`; real ones are a few dozen characters


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document of more than MAX_YAML_NODES nodes, as
    written (counted while composing) or with its aliases expanded (before constructing
    any Python object from it)."""

    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            msg = f"the document has more than {MAX_YAML_NODES:,} values"
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, msg, mark)
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        n = expanded_size(node)
        if n > MAX_YAML_NODES:
            mark = node.start_mark
            msg = (f"the document expands to more than {MAX_YAML_NODES:,} values once its "
                   "aliases (*name) are resolved")
            raise yaml.constructor.ConstructorError(None, None, msg, mark)
        return super().construct_document(node)


def expanded_size(root: yaml.Node, stop: int = MAX_YAML_NODES) -> int:
    """Number of nodes with every alias expanded, counting up to just past `stop`.

    An alias is the same node object reached twice: sizes are memoized per node, so
    this is linear in the file however large the expansion is."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for kv in node.value for x in kv]
        else:
            size[id(node)] = 1
            continue
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[id(node)] = min(stop + 1, 1 + sum(size.get(id(c), 1) for c in children))
    return size[id(root)]


def read_yaml(path: Path, problems: list[Problem]) -> Any:
    """The one YAML reader (config, profiles, simulator scenarios), bounded in file size
    (YAML_MAX_BYTES), in nodes and in expanded size (MAX_YAML_NODES)."""
    if (prob := file_problem(path, YAML_MAX_BYTES)) is not None:
        problems.append(Problem(str(path), "-", prob,
                                "point it at a YAML file (a regular file, not a device)"))
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(YAML_MAX_BYTES + 1)  # a file that grew since: still bounded
    except FileNotFoundError:
        problems.append(Problem(str(path), "-", "file not found",
                                "check the path (relative paths are from the config file)"))
        return None
    except OSError as e:
        problems.append(Problem(str(path), "-", f"cannot read: {e.strerror or e}"))
        return None
    if len(raw) > YAML_MAX_BYTES:
        problems.append(Problem(str(path), "-", f"more than the {YAML_MAX_BYTES} bytes allowed",
                                "check the path; real configs and profiles are a few kB"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        problems.append(Problem(str(path), f"line {line}", f"not UTF-8 text ({e.reason} at "
                                f"byte {e.start})", "save the file as UTF-8"))
        return None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
        _no_surrogates(path, data, problems)
        return data
    except RecursionError:
        problems.append(Problem(str(path), "-", "nested too deeply",
                                "a config or profile needs a few levels of nesting, not hundreds"))
        return None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "-"
        problem = getattr(e, "problem", None) or e
        fix = ("write the values out, or use fewer nested aliases" if "aliases" in str(problem)
               else "split the file, or check the path" if "values" in str(problem)
               else "fix the indentation or quoting at that spot")
        problems.append(Problem(str(path), where, f"invalid YAML: {problem}", fix))
        return None


# ---------------------------------------------------------------- profile parsing

_VALUE_KEYS = {"message", "signal", "expr", "const", "scale", "offset", "unit", "invert",
               "valid", "map", "bit", "values", "sources", "fresh_s", "sentinel"}


def _int_list(r: _Reader, key: str, obj: Any, what: str) -> tuple[int, ...]:
    if obj is None:
        return ()
    items = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        r.bad(key, f"{what} must be whole numbers (raw values as in the frame)",
              "e.g. [0xFFFF] or [255, 254]")
        return ()
    return tuple(items)


def _sources_spec(r: _Reader, key: str, spec: dict[str, Any]) -> ValueSpec | None:
    """`sources: [...]`: the first source whose message is fresh gives the value."""
    others = sorted(set(spec) - {"sources", "fresh_s"})
    if others:
        r.bad(key, f"`sources` replaces {', '.join(others)}",
              "move them into each source, or drop `sources` for a single source")
        return None
    items = spec["sources"]
    if not isinstance(items, list) or len(items) < 2:
        r.bad(f"{key}.sources", "needs a list of two or more sources, highest priority first",
              "e.g. sources: [{message: Pack, signal: V}, {message: String0, signal: V}]")
        return None
    subs: list[ValueSpec] = []
    for i, item in enumerate(items):
        k = f"{key}.sources[{i}]"
        if isinstance(item, dict) and ("sources" in item or "fresh_s" in item):
            r.bad(k, "sources do not nest", "list every source in the one `sources` list")
            return None
        sub = _value_spec(r, k, item, None)
        if sub is None:
            return None
        if sub.message is None:
            r.bad(k, "a source needs a `message` (a constant is never stale)",
                  "drop this source, or make the constant the field's only value")
            return None
        subs.append(sub)
    return ValueSpec(key=key, sources=tuple(subs), fresh_s=r.num(spec, key, "fresh_s", None,
                                                                 lo=0.01))


def _value_spec(r: _Reader, key: str, obj: Any, default_message: str | None) -> ValueSpec | None:
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if not math.isfinite(obj):
            r.bad(key, f"must be a finite number, got {obj!r}", "write a plain number")
            return None
        return ValueSpec(key=key, const=float(obj))
    spec = r.mapping(obj, key)
    if not spec:
        return None
    if "sources" in spec:
        return _sources_spec(r, key, spec)
    cross = bool(spec.get("expr")) and not spec.get("message")  # Message.Signal names
    if "fresh_s" in spec and not cross:
        r.bad(f"{key}.fresh_s", "only applies to `sources` and to an `expr` over "
              "Message.Signal names", "remove it, or list `sources`")
    r.known(spec, key, _VALUE_KEYS)
    message = r.str_(spec, key, "message", default_message)
    signal = r.str_(spec, key, "signal", None)
    expr = r.str_(spec, key, "expr", None)
    if expr is not None and len(expr) > MAX_EXPR_CHARS:
        # compiled into a frame handler: a huge one costs seconds to compile (on reload)
        # and nests past Python's parser limits
        r.bad(f"{key}.expr", f"{len(expr):,} characters long (at most {MAX_EXPR_CHARS})",
              "split the computation, or decode the value with a DBC signal")
        return None
    const = r.num(spec, key, "const", None)
    sources = [x for x in (signal, expr, const) if x is not None]
    if len(sources) != 1:
        r.bad(key, "needs exactly one of `signal`, `expr` or `const`",
              "e.g. {message: Pack, signal: Voltage}")
        return None
    if signal and not message:
        r.bad(key, "names a signal but no `message`", "add message: <DBC message name>")
        return None
    unit = r.str_(spec, key, "unit", None)
    if unit is not None and unit not in UNIT_FACTORS:
        r.bad(f"{key}.unit", f"unknown unit {unit!r}",
              nearest(unit, UNIT_FACTORS.keys()) or f"one of {', '.join(UNIT_FACTORS)}")
    mapping = spec.get("map")
    if mapping is not None and not isinstance(mapping, dict):
        r.bad(f"{key}.map", "must map DBC values or choice names to our names")
        mapping = None
    bit = r.int_(spec, key, "bit", None, lo=0)
    vals = spec.get("values")
    values: tuple[int, ...] | None = None
    if vals is not None:
        if isinstance(vals, int):
            vals = [vals]
        if not isinstance(vals, list) or not all(isinstance(x, int) for x in vals):
            r.bad(f"{key}.values", "must be a list of whole numbers")
        else:
            values = tuple(vals)
    sentinel = _int_list(r, f"{key}.sentinel", spec.get("sentinel"), "sentinel values")
    if sentinel and signal is None:
        r.bad(f"{key}.sentinel", "sentinel values are raw values of one `signal`",
              "use `signal:` instead of `expr:`/`const:`, or remove sentinel")
    return ValueSpec(
        key=key, message=message, signal=signal, expr=expr, const=const, sentinel=sentinel,
        scale=r.num(spec, key, "scale", 1.0) or 1.0, offset=r.num(spec, key, "offset", 0.0) or 0.0,
        unit=unit, invert=r.bool_(spec, key, "invert", False), valid=r.range_(spec, key, "valid"),
        mapping={(k if isinstance(k, int) else str(k)): str(v) for k, v in mapping.items()}
        if mapping else None,
        bit=bit, values=values,
        fresh_s=r.num(spec, key, "fresh_s", None, lo=0.01) if cross else None,
    )


_CELL_KEYS = {"message", "signals", "signal", "index", "mux", "stride", "offset", "first",
              "order", "name_base", "invalid", "invalid_value", "bitfield", "unit", "scale",
              "valid", "sentinel"}


def _cell_layout_ok(r: _Reader, k: str, spec: dict[str, Any], kind: str) -> bool:
    """Reject the layout keys that cannot work together (each with its fix)."""
    mux, index = bool(spec.get("mux")), spec.get("index") is not None
    name = spec.get("order") == "name"
    bad: list[tuple[str, str, str]] = []
    if mux and index:
        bad.append(("index", "`mux: true` and `index:` both choose the group",
                    "keep `mux: true` when the message's multiplexer numbers the groups, "
                    "else `index:`"))
    if "stride" in spec and not (mux or index):
        bad.append(("stride", "`stride` needs `mux: true` or `index:` (the group it multiplies)",
                    "use `first:` for a fixed first cell"))
    if "stride" in spec and mux and name:
        bad.append(("stride", "with `mux: true` and `order: name` the number in each name "
                    "places the cell; `stride` is not used", "remove `stride`, or use order: position"))
    if "first" in spec and "offset" in spec:
        bad.append(("first", "`first` and `offset` both shift the cells", "give one of them"))
    if "name_base" in spec and not name:
        bad.append(("name_base", "`name_base` only applies to `order: name`",
                    "add order: name, or remove name_base"))
    if "invalid_value" in spec and spec.get("invalid") is None:
        bad.append(("invalid_value", "`invalid_value` without `invalid` flags",
                    "add invalid: [flag signals], or remove invalid_value"))
    if spec.get("bitfield") and kind != "balancing":
        bad.append(("bitfield", "`bitfield` is for balancing flags packed in one signal",
                    "move this source under cells.balancing, or remove bitfield"))
    for key, what, fix in bad:
        r.bad(f"{k}.{key}", what, fix)
    return not bad


def _cell_sources(r: _Reader, key: str, obj: Any) -> tuple[CellSource, ...]:
    if obj is None:
        return ()
    items = obj if isinstance(obj, list) else [obj]
    out: list[CellSource] = []
    for i, item in enumerate(items):
        k = f"{key}[{i}]"
        spec = r.mapping(item, k)
        if not spec:
            continue
        r.known(spec, k, _CELL_KEYS)
        message = r.str_(spec, k, "message", None)
        sigs: Any = spec.get("signals", spec.get("signal"))
        if message is None or sigs is None:
            r.bad(k, "needs `message` and `signals` (a list of names or a pattern like 'Cell*')")
            continue
        if isinstance(sigs, list):
            signals: tuple[str, ...] | str = tuple(str(s) for s in sigs)
        else:
            signals = str(sigs)
        inv: Any = spec.get("invalid")
        invalid = tuple(str(s) for s in inv) if isinstance(inv, list) else (
            str(inv) if inv is not None else None)
        index: Any = spec.get("index")
        order = r.str_(spec, k, "order", "position")
        if order not in ("position", "name"):
            r.bad(f"{k}.order", f"must be 'position' or 'name', got {order!r}")
            order = "position"
        if not _cell_layout_ok(r, k, spec, kind=key.rsplit(".", 1)[-1]):
            continue
        out.append(CellSource(
            key=k, message=message, signals=signals,
            index_signal=str(index) if index is not None else None,
            mux=r.bool_(spec, k, "mux", False),
            stride=r.int_(spec, k, "stride", None, lo=1),
            offset=r.int_(spec, k, "offset", 0) or 0,
            first=r.int_(spec, k, "first", 0, lo=0) or 0,
            order=order,  # type: ignore[arg-type]
            name_base=r.int_(spec, k, "name_base", 1) or 0,
            invalid=invalid, invalid_value=r.int_(spec, k, "invalid_value", 1) or 0,
            bitfield=r.bool_(spec, k, "bitfield", False),
            unit=r.str_(spec, k, "unit", None), scale=r.num(spec, k, "scale", 1.0) or 1.0,
            valid=r.range_(spec, k, "valid"),
            sentinel=_int_list(r, f"{k}.sentinel", spec.get("sentinel"), "sentinel values"),
        ))
        unit = out[-1].unit
        if unit is not None and unit not in UNIT_FACTORS:
            r.bad(f"{k}.unit", f"unknown unit {unit!r}", nearest(unit, UNIT_FACTORS.keys()))
    return tuple(out)


def _entries(r: _Reader, key: str, obj: Any, example: str,
             ) -> list[tuple[str, dict[str, Any]]]:
    """A profile list of mappings as (key, mapping); a problem if it is not a list."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        r.bad(key, "must be a list", example)
        return []
    return [(f"{key}[{i}]", r.mapping(item, f"{key}[{i}]")) for i, item in enumerate(obj)]


def _gates(r: _Reader, obj: Any) -> tuple[Gate, ...]:
    out: list[Gate] = []
    for k, spec in _entries(r, "gates", obj, "gates: [{message: ..., signal: ..., values: [...]}]"):
        r.known(spec, k, {"message", "signal", "values", "ignore"})
        message, signal = r.str_(spec, k, "message", None), r.str_(spec, k, "signal", None)
        vals: Any = spec.get("values")
        vals = vals if isinstance(vals, list) else ([] if vals is None else [vals])
        if not message or not signal or not vals:
            r.bad(k, "needs `message`, `signal` and `values` (raw values or choice names)",
                  "e.g. {message: BmsState, signal: State, values: [INIT]}")
            continue
        if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in vals):
            r.bad(f"{k}.values", "must be whole numbers or the DBC's choice names")
            continue
        ign: Any = spec.get("ignore")
        ignore = None if ign is None else tuple(str(x) for x in (ign if isinstance(ign, list)
                                                                  else [ign]))
        out.append(Gate(k, message, signal, tuple(vals), ignore))
    return tuple(out)


def _checks(r: _Reader, obj: Any) -> tuple[FrameCheck, ...]:
    out: list[FrameCheck] = []
    seen: set[str] = set()
    for k, spec in _entries(r, "checks", obj, "checks: [{message: ..., checksum: ..., counter: ...}]"):
        r.known(spec, k, {"message", "checksum", "method", "with_id", "with_length", "counter",
                          "max_step"})
        message = r.str_(spec, k, "message", None)
        checksum, counter = r.str_(spec, k, "checksum", None), r.str_(spec, k, "counter", None)
        if not message or not (checksum or counter):
            r.bad(k, "needs `message` and a `checksum` or `counter` signal (or both)",
                  "e.g. {message: Pack, checksum: Crc, method: crc8_sae_j1850, counter: Alive}")
            continue
        if message in seen:
            r.bad(f"{k}.message", f"{message!r} already has checks", "merge the two entries")
            continue
        seen.add(message)
        method = r.str_(spec, k, "method", "sum8") or "sum8"
        if method not in CHECKSUM_METHODS:
            r.bad(f"{k}.method", f"unknown checksum method {method!r}",
                  nearest(method, CHECKSUM_METHODS) or f"one of {', '.join(CHECKSUM_METHODS)}")
            continue
        if checksum is None and any(x in spec for x in ("method", "with_id", "with_length")):
            r.bad(k, "`method`, `with_id` and `with_length` describe a `checksum`",
                  "add checksum: <signal>, or remove them")
            continue
        if counter is None and "max_step" in spec:
            r.bad(f"{k}.max_step", "only applies to a `counter`", "add counter: <signal>")
            continue
        out.append(FrameCheck(k, message, checksum, method, r.bool_(spec, k, "with_id", False),
                              r.bool_(spec, k, "with_length", False), counter,
                              r.int_(spec, k, "max_step", None, lo=1)))
    return tuple(out)


def _dtcs(r: _Reader, obj: Any) -> tuple[DtcStream, ...]:
    out: list[DtcStream] = []
    seen: dict[tuple[str, str] | str, str] = {}  # (message, signal) / code -> its entry
    for k, spec in _entries(r, "dtcs", obj, "dtcs: [{message: ..., signal: ...}]"):
        r.known(spec, k, {"message", "signal", "code", "severity", "clear_after_s", "none"})
        message, signal = r.str_(spec, k, "message", None), r.str_(spec, k, "signal", None)
        if not message or not signal:
            r.bad(k, "needs `message` and `signal` (the signal carrying the trouble code)",
                  "e.g. {message: Dtc, signal: DtcCode}")
            continue
        code = r.str_(spec, k, "code", "bms_dtc") or "bms_dtc"
        if (prob := topic_segment_problem(code)) is not None:
            r.bad(f"{k}.code", prob)
        sev = r.str_(spec, k, "severity", "warning")
        if sev not in SEVERITIES:
            r.bad(f"{k}.severity", f"unknown severity {sev!r}", f"one of {', '.join(SEVERITIES)}")
            continue
        # the same stream twice, or two streams with one code, raise each fault twice
        if (message, signal) in seen:
            r.bad(f"{k}.signal", f"{message}.{signal} is already a trouble-code stream "
                  f"({seen[message, signal]})", "remove one of the two entries")
            continue
        if code in seen:
            r.bad(f"{k}.code", f"{code!r} is already the code of {seen[code]}: both would "
                  f"raise the same `{code}_<number>` faults", "give each stream its own `code`")
            continue
        seen[message, signal] = seen[code] = k
        none = _int_list(r, f"{k}.none", spec.get("none", [0]), "`none` values")
        out.append(DtcStream(k, message, signal, code, sev,
                             r.num(spec, k, "clear_after_s", 5.0, lo=0.01) or 5.0, none))
    return tuple(out)


def _resolve_file(base: Path, name: str, builtin: Path) -> Path:
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        return p
    for cand in (base / p, builtin / p, PROJECT_ROOT / p):
        if cand.exists():
            return cand
    return base / p


def find_profile(name: str, base: Path) -> Path:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return _resolve_file(base, name, BUILTIN_PROFILES)
    for d in (base / "profiles", BUILTIN_PROFILES):
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").exists():
                return d / f"{name}{ext}"
    return BUILTIN_PROFILES / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in BUILTIN_PROFILES.glob("*.yaml"))


_PROFILE_KEYS = {"name", "description", "dbc", "fields", "cells", "faults", "poll", "gates",
                 "dtcs", "checks",
                 "cell_count", "stale_after_s", "extras", "notes", "chemistry", "isotp",
                 "poll_id_offset_shift"}
CHEMISTRIES = ("lfp", "nmc", "nca", "lmo", "lto", "sodium", "other")


def load_profile(path: Path, problems: list[Problem]) -> Profile | None:
    data = read_yaml(path, problems)
    if data is None:
        return None
    r = _Reader(str(path), problems)
    top = r.mapping(data, "(top level)")
    r.known(top, "", _PROFILE_KEYS)
    dbc_list = top.get("dbc", [])
    if isinstance(dbc_list, str):
        dbc_list = [dbc_list]
    dbcs = tuple(_resolve_file(path.parent, str(d), BUILTIN_DBC) for d in dbc_list or [])
    fields: dict[str, ValueSpec] = {}
    for name, spec in r.mapping(top.get("fields"), "fields").items():
        if name not in FIELD_BY_NAME:
            r.bad(f"fields.{name}", "not a field of the pack model",
                  nearest(name, FIELD_BY_NAME.keys()) or "see docs/mqtt.md for the field list")
            continue
        vs = _value_spec(r, f"fields.{name}", spec, None)
        if vs is not None:
            fields[name] = vs
    extras: dict[str, ValueSpec] = {}
    for name, spec in r.mapping(top.get("extras"), "extras").items():
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", str(name)) or name in FIELD_BY_NAME:
            r.bad(f"extras.{name}", "extra names are lower_snake_case and not model field names")
            continue
        vs = _value_spec(r, f"extras.{name}", spec, None)
        if vs is not None:
            extras[name] = vs
    cells_obj = r.mapping(top.get("cells"), "cells")
    r.known(cells_obj, "cells", {"voltages", "temps", "balancing"})
    cells = {k: _cell_sources(r, f"cells.{k}", cells_obj.get(k))
             for k in ("voltages", "temps", "balancing")}
    faults: list[BmsFault] = []
    for i, f in enumerate(top.get("faults") or []):
        k = f"faults[{i}]"
        spec = r.mapping(f, k)
        r.known(spec, k, {"code", "message", "signal", "severity", "bit", "values", "text",
                          "cell_signal", "cell_base"})
        code, msg, sig = (r.str_(spec, k, n, None) for n in ("code", "message", "signal"))
        sev = r.str_(spec, k, "severity", "alarm")
        if sev not in SEVERITIES:
            r.bad(f"{k}.severity", f"unknown severity {sev!r}", f"one of {', '.join(SEVERITIES)}")
            continue
        if not code or not msg or not sig:
            r.bad(k, "needs `code`, `message` and `signal`")
            continue
        if (prob := topic_segment_problem(code)) is not None:
            r.bad(f"{k}.code", prob)
        vals = spec.get("values")
        faults.append(BmsFault(k, code, msg, sig, sev,
                               r.int_(spec, k, "bit", None, lo=0),
                               tuple(vals) if isinstance(vals, list) else
                               ((vals,) if isinstance(vals, int) else None),
                               r.str_(spec, k, "text", "") or "",
                               r.str_(spec, k, "cell_signal", None),
                               r.int_(spec, k, "cell_base", 1) or 0))
    gates = _gates(r, top.get("gates"))
    dtcs = _dtcs(r, top.get("dtcs"))
    checks = _checks(r, top.get("checks"))
    polls: list[PollRequest] = []
    for i, p in enumerate(top.get("poll") or []):
        k = f"poll[{i}]"
        spec = r.mapping(p, k)
        r.known(spec, k, {"message", "id", "extended", "data", "period_s", "reply"})
        data_hex = r.str_(spec, k, "data", "") or ""
        try:
            data = bytes.fromhex(data_hex)
        except ValueError:
            r.bad(f"{k}.data", f"not hex bytes: {data_hex!r}", "e.g. data: '0000000000000000'")
            data = b""
        can_id = r.int_(spec, k, "id", None, lo=0)
        msg = r.str_(spec, k, "message", None)
        if (can_id is None) == (msg is None):
            r.bad(k, "needs exactly one of `message` (a DBC message) or `id`")
            continue
        polls.append(PollRequest(k, r.num(spec, k, "period_s", 1.0, lo=0.01) or 1.0, msg, can_id,
                                 r.bool_(spec, k, "extended", False), data,
                                 r.str_(spec, k, "reply", None)))
    cc = r.int_(top, "", "cell_count", None, lo=1, hi=MAX_CELLS)
    return Profile(
        name=str(top.get("name", path.stem)), path=path,
        description=str(top.get("description", "")), dbc=dbcs, fields=fields, cells=cells,
        faults=tuple(faults), poll=tuple(polls), cell_count=cc, gates=gates, dtcs=dtcs, checks=checks,
        stale_after_s=r.num(top, "", "stale_after_s", None, lo=0.1), extras=extras,
        chemistry=_chemistry(r, top, "chemistry"),
        isotp=_isotp_list(r, top.get("isotp")),
        poll_id_offset_shift=r.int_(top, "", "poll_id_offset_shift", 0, lo=0) or 0,
    )


def _isotp_list(r: _Reader, obj: Any) -> tuple[dict[str, Any], ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list) or not all(isinstance(x, dict) for x in obj):
        r.bad("isotp", "must be a list of ISO-TP requests (mappings)",
              "see docs/profiles.md, e.g. [{request_id: 0x79B, response_id: 0x7BB, ...}]")
        return ()
    return tuple(obj)


def _chemistry(r: _Reader, obj: dict[str, Any], key: str) -> str | None:
    chem = r.str_(obj, "", "chemistry", None)
    if chem is not None and chem.lower() not in CHEMISTRIES:
        r.bad(key, f"unknown chemistry {chem!r}",
              nearest(chem.lower(), CHEMISTRIES) or f"one of {', '.join(CHEMISTRIES)}")
        return None
    return chem.lower() if chem else None


# ---------------------------------------------------------------- gateway parsing

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


def default_state_dir() -> Path:
    if sd := os.environ.get("STATE_DIRECTORY"):
        return Path(sd.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "bms-gateway"


def _publish_policy(r: _Reader, key: str, obj: Any, base: PublishPolicy) -> PublishPolicy:
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


def _can_buses(r: _Reader, obj: Any) -> list[CanBus]:
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
        buses.append(CanBus(name, interface, channel, r.int_(spec, k, "bitrate", None, lo=1000),
                            r.bool_(spec, k, "fd", False),
                            r.int_(spec, k, "data_bitrate", None, lo=1000), dict(opts),
                            receive,  # type: ignore[arg-type]
                            r.bool_(spec, k, "kernel_filter", True),
                            r.num(spec, k, "bcm_throttle_s", 0.0, lo=0, hi=60) or 0.0))
    names = [b.name for b in buses]
    for n in {x for x in names if names.count(x) > 1}:
        r.bad("can", f"two buses are named {n!r}", "give each a distinct `name`")
    return buses


def _password(r: _Reader, spec: dict[str, Any], base: Path) -> str | None:
    if "password" in spec:
        import logging

        logging.getLogger("gateway.config").warning(
            "%s: mqtt.password is inline; prefer password_file or password_env", r.file)
        return r.str_(spec, "mqtt", "password", None)
    if pf := r.str_(spec, "mqtt", "password_file", None):
        p = _resolve_file(base, pf, base)
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


def _topic_prefix(r: _Reader, key: str, prefix: str, example: str) -> None:
    """A prefix the gateway publishes (and deletes retained topics) under: no wildcards,
    no `$` (brokers reserve `$SYS`... and refuse or drop what clients publish there)."""
    if prefix.startswith("$"):
        r.bad(key, f"{prefix!r} starts with '$' (topics reserved for the broker)",
              f"use a plain prefix, e.g. {key.rsplit('.', 1)[1]}: {example}")
    for seg in prefix.split("/"):
        if (prob := topic_segment_problem(seg)) is not None and seg != "":
            r.bad(key, f"segment {seg!r} {prob}",
                  f"use a plain prefix, e.g. {key.rsplit('.', 1)[1]}: {example}")


def _homeassistant(r: _Reader, obj: Any) -> HomeAssistantConfig:
    ha = r.mapping(obj, "homeassistant")
    r.known(ha, "homeassistant", {"discovery", "prefix"})
    prefix = (r.str_(ha, "homeassistant", "prefix", "homeassistant")
              or "homeassistant").rstrip("/")
    _topic_prefix(r, "homeassistant.prefix", prefix, "homeassistant")
    if not prefix:
        r.bad("homeassistant.prefix", "must not be empty", "e.g. prefix: homeassistant")
    return HomeAssistantConfig(r.bool_(ha, "homeassistant", "discovery", False), prefix)


def _mqtt(r: _Reader, obj: Any, base: Path) -> MqttConfig:
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
                p = _resolve_file(base, v, base)
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


# ------------------------------------------- values the daemon cannot run with (issue 10)
# check-config is the contract: what it accepts must start and run, so these are the
# values that got through it and then failed (a traceback, 8 GB, a read of /dev/zero).

MAX_CELLS = 1024  # cells per pack: 16 s x 64 p is the largest seen; bounds allocation
YAML_MAX_BYTES = 4 * 1024 * 1024
DBC_MAX_BYTES = 64 * 1024 * 1024


def file_problem(path: Path, max_bytes: int) -> str | None:
    """A config, profile or DBC path must be a regular file of a sane size."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing files get their own message where they are used
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_size > max_bytes:
        return f"{path} is {st.st_size} bytes, more than the {max_bytes} allowed"
    return None


_ID_OK = re.compile(r"[A-Za-z0-9_-]+")
ID_FIX = "use letters, digits, '-' and '_' (not '_' first), e.g. house-1"


def id_problem(value: str) -> str | None:
    """A gateway or pack id: an MQTT topic segment, a client id, a file name and part of
    Home Assistant's node ids, which HA takes only as `[a-zA-Z0-9_-]+`; anything else
    passed here once and then silently announced nothing. A leading '_' is refused so
    that `homeassistant.node_body` stays unambiguous (it ends the gateway id with '_')."""
    if (prob := topic_segment_problem(value)) is not None:
        return prob
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text (a lone surrogate escape)"
    if not _ID_OK.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _ID_OK.fullmatch(c)}))
        return (f"contains {bad!r}: ids are MQTT topic segments and Home Assistant node ids, "
                "which take only letters, digits, '-' and '_'")
    if value.startswith("_"):
        return "starts with '_' (Home Assistant node ids would be ambiguous)"
    return None


def state_dir_problem(path: Path) -> str | None:
    """A state directory the daemon could not create its outbox in, where that is certain
    (whether the service user may write it is not known here: check-config may run as
    another user)."""
    if path.exists():
        return None if path.is_dir() else f"{path} exists and is not a directory"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{path} cannot be created: {parent} is not a directory"
            return None
    return None


HOST_MAX = 253
LABEL_MAX = 63


def host_problem(host: str) -> str | None:
    """A broker host name the resolver can take (labels <= 63, total <= 253, IDNA):
    otherwise every connect fails with UnicodeError, which retrying cannot fix."""
    if ":" in host:  # an IPv6 literal (the URL had it in brackets)
        return None
    if not host:
        return "has no host name"
    if len(host) > HOST_MAX:
        return f"host name is {len(host)} characters long, more than {HOST_MAX}"
    for label in host.rstrip(".").split("."):
        if not label:
            return f"host name {host!r} has an empty label (two dots in a row)"
        if len(label) > LABEL_MAX:
            return f"host name label {label[:20]}... is {len(label)} characters, more than {LABEL_MAX}"
    try:
        host.encode("idna")
    except UnicodeError as e:
        return f"host name {host!r} is not a valid international name ({e})"
    return None


def _no_surrogates(path: Path, data: Any, problems: list[Problem]) -> None:
    """A "\\udc80" escape in YAML gives a str that no UTF-8 encoder takes: MQTT topics,
    payloads and logs would fail at run time. Walk the tree once (shared nodes once)."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        key, node = todo.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(Problem(str(path), key or "(top level)",
                                        "text with a lone surrogate escape (\\ud800-\\udfff) "
                                        "is not valid UTF-8", "remove the \\u escape"))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for k, v in node.items():
                sub = f"{key}.{k}" if key else str(k)
                todo.append((sub, k))
                todo.append((sub, v))
        elif isinstance(node, list):
            todo.extend((f"{key}[{i}]", v) for i, v in enumerate(node))


def can_interface_problem(name: str) -> tuple[str, str] | None:
    """python-can's interface names; an unknown one otherwise retries for ever at run time."""
    from can.interfaces import VALID_INTERFACES

    if name in VALID_INTERFACES:
        return None
    return (f"unknown CAN interface {name!r}",
            nearest(name, VALID_INTERFACES)
            or f"one of {', '.join(sorted(VALID_INTERFACES))} (python-can's names)")


def _log_format(r: _Reader, obj: Any) -> tuple[str, str | None, int | None] | None:
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
    r = _Reader(str(p), problems)
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
                _resolve_file(base, str(d), BUILTIN_DBC) for d in extra_dbc))
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
        rules = dict(global_rules)
        for name, ov in r.mapping(spec.get("rules"), f"{k}.rules").items():
            base_rule = rules.get(name)  # a pack's keys refine the global rule, key by key
            rules[name] = ({**base_rule, **ov} if isinstance(base_rule, dict)
                           and isinstance(ov, dict) else ov)
        packs.append(PackConfig(
            id=pid, profile=profile, bus=bus, id_offset=r.int_(spec, k, "id_offset", 0) or 0,
            transmit=r.bool_(spec, k, "transmit", False), stale_after_s=stale or 10.0,
            cell_count=r.int_(spec, k, "cell_count", profile.cell_count, lo=1, hi=MAX_CELLS),
            publish=_publish_policy(r, f"{k}.publish", spec.get("publish"), publish),
            rules=rules,
            chemistry=_chemistry(r, spec, f"{k}.chemistry") or profile.chemistry or "lfp",
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
    if problems:
        raise ConfigError(problems)
    return GatewayConfig(
        path=p, gateway_id=gid, state_dir=state_dir, log_level=level, buses=tuple(buses),
        packs=tuple(packs), mqtt=mqtt,
        homeassistant=ha,
        outbox=outbox,
        shutdown_timeout_s=shutdown,
        prometheus=prom,
        log_format=log_format,
    )
