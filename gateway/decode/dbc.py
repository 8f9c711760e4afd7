"""Decode stage: DBC loading with readable errors, and signal extraction compiled once.

cantools parses the DBC; at run time we do not call it per frame. For each signal the
profile uses we precompute where its bits sit in the frame read as one integer
(little-endian signals from `int.from_bytes(data, "little")`, big-endian ones from
`int.from_bytes(data, "big")`), so extraction is a shift and a mask. The normalize
stage turns these extraction recipes into one Python function per message. Property
tests hold every recipe equal to `cantools` `decode_message` on random payloads.
"""

from __future__ import annotations

import dataclasses
import linecache
import logging
import re
import struct
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cantools
from cantools.database import Database
from cantools.database.can import Message, Signal

from gateway.errors import EXIT_CONFIG, GatewayError

log = logging.getLogger("gateway.decode")

EXTENDED_FLAG = 0x80000000  # key bit for 29-bit identifiers, as DBC files write them


class DbcError(GatewayError):
    """A DBC file could not be loaded; the message says which file, where, and what to do."""

    exit_code = EXIT_CONFIG


def frame_key(arbitration_id: int, is_extended: bool) -> int:
    return arbitration_id | EXTENDED_FLAG if is_extended else arbitration_id


def message_key(msg: Message) -> int:
    return frame_key(msg.frame_id, msg.is_extended_frame)


_LINE_RE = re.compile(r"line (\d+)")


def _explain_dbc_error(path: Path, text: str, err: Exception) -> str:
    detail = str(err).strip().strip('"')
    first = detail.splitlines()[0] if detail else type(err).__name__
    where = ""
    fix = "check the file in a DBC editor, or load it with `python -m cantools dump FILE`"
    m = _LINE_RE.search(detail)
    if m:
        where = f", line {m.group(1)}"
    if "unused VAL_ entries" in detail:
        ids = sorted(set(re.findall(r"VAL_ (\d+) ", detail)))
        lines = [str(n) for n, ln in enumerate(text.splitlines(), 1)
                 if any(ln.startswith(f"VAL_ {i} ") for i in ids)]
        where = f", lines {', '.join(lines[:8])}{'...' if len(lines) > 8 else ''}"
        fix = ("these VAL_ value tables name signals of a message the file does not define "
               "(often VECTOR__INDEPENDENT_SIG_MSG, id 3221225472): delete those VAL_ lines "
               "or move them under the message that has the signal, or set "
               "`dbc_lenient: true` on the pack to load it with them ignored (each reported)")
    elif "overlapping" in detail or "duplicate" in detail.lower():
        fix = "two signals share bits; the gateway loads DBCs non-strictly, so this should not happen: report it"
    return f"{path}{where}: cantools cannot load this DBC: {first}. Fix: {fix}"


def _orphan_values(text: str, err: Exception) -> list[int]:
    """Line numbers (1-based) of the VAL_ lines cantools calls unused: value tables for a
    message the file does not define (VECTOR__INDEPENDENT_SIG_MSG...)."""
    ids = set(re.findall(r"VAL_ (\d+) ", str(err)))
    return [n for n, ln in enumerate(text.splitlines(), 1)
            if ln.startswith("VAL_ ") and ln.split(maxsplit=2)[1] in ids]


def load_dbc(path: str | Path, *, lenient: bool = False) -> Database:
    """Load a DBC non-strictly (real DBCs overlap signals and reuse names).

    `lenient`: where cantools refuses the file for a mechanical reason (VAL_ lines on a
    message the file does not define), load it without those lines and log each one.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        msg = f"{p}: cannot read DBC file: {e.strerror or e}"
        raise DbcError(msg) from e
    # Real DBCs come in cp1252 or GBK as often as UTF-8; cantools wants text.
    for enc in ("utf-8", "cp1252", "gbk", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    db = cantools.database.Database(strict=False)
    try:
        db.add_dbc_string(text)
    except Exception as e:  # cantools raises many types for bad input
        orphans = _orphan_values(text, e) if lenient and "unused VAL_ entries" in str(e) else []
        if not orphans:
            raise DbcError(_explain_dbc_error(p, text, e)) from e
        lines = text.splitlines()
        for n in orphans:
            log.warning("%s:%d: ignored (dbc_lenient): %s", p, n, lines[n - 1][:100])
        skip = set(orphans)
        db = cantools.database.Database(strict=False)
        try:
            db.add_dbc_string("\n".join(ln for i, ln in enumerate(lines, 1) if i not in skip))
        except Exception as e2:
            raise DbcError(_explain_dbc_error(p, text, e2)) from e2
    if not db.messages:
        msg = f"{p}: no BO_ messages found: is this a DBC file?"
        raise DbcError(msg)
    return db


@dataclass(frozen=True, slots=True)
class BitField:
    """Where one signal's raw bits sit when the frame is read as a single integer."""

    name: str
    big_endian: bool
    shift: int  # right shift applied to the frame integer
    mask: int
    signed: bool
    float_fmt: str | None  # struct format for IEEE float signals
    scale: float | int
    offset: float | int
    min_bytes: int  # frame must be at least this long to carry the signal
    length: int

    def expr(self, var_le: str, var_be: str) -> str:
        """A Python expression (numbers only) for the physical value."""
        src = var_be if self.big_endian else var_le
        raw = f"(({src} >> {self.shift}) & {self.mask:#x})" if self.shift else f"({src} & {self.mask:#x})"
        if self.float_fmt is not None:
            size = self.length // 8
            raw = f"_unpack({self.float_fmt!r}, {raw}.to_bytes({size}, 'big'))"
        elif self.signed:
            sb = 1 << (self.length - 1)
            raw = f"(({raw} ^ {sb:#x}) - {sb:#x})"
        if self.scale == 1 and self.offset == 0:
            return raw
        if self.offset == 0:
            return f"({raw} * {self.scale!r})"
        return f"({raw} * {self.scale!r} + {self.offset!r})"


def bitfield(msg: Message, sig: Signal) -> BitField:
    length = msg.length
    total = length * 8
    if sig.byte_order == "little_endian":
        shift = sig.start
        big = False
        top = sig.start + sig.length - 1
        min_bytes = top // 8 + 1
    else:
        # DBC big-endian: start is the MSB in "sawtooth" numbering.
        msb = (sig.start // 8) * 8 + (7 - sig.start % 8)
        lsb = msb + sig.length - 1
        shift = total - 1 - lsb
        big = True
        min_bytes = lsb // 8 + 1
    float_fmt = None
    if sig.is_float:
        float_fmt = ">f" if sig.length == 32 else ">d"
    return BitField(sig.name, big, shift, (1 << sig.length) - 1, bool(sig.is_signed),
                    float_fmt, sig.scale, sig.offset, min_bytes, sig.length)


def unpack_float(fmt: str, b: bytes) -> float:
    return float(struct.unpack(fmt, b)[0])


def mux_signal(msg: Message) -> Signal | None:
    for s in msg.signals:
        if s.is_multiplexer and s.multiplexer_ids is None:
            return s
    return None



# ---------------------------------------------------------------- the message as data
#
# One description of a message (`MessageLayout`: each signal cantools reports, where its
# bits are, and the multiplexer values that must hold for it to be present) and one
# code generator (`Source`) that production's frame handlers (gateway/normalize/) and
# `compile_message` both use. Extended (nested) multiplexing is a path of several
# `MuxStep`s: a signal is present only when every multiplexer on its path has one of
# its listed values, which is how cantools decides.


@dataclass(frozen=True, slots=True)
class MuxStep:
    """One multiplexer on a signal's path: the signal is present when its raw value is
    one of `values` (compared raw, as DBC files write them)."""

    muxer: str
    values: frozenset[int]


@dataclass(frozen=True, slots=True)
class SignalRead:
    """One signal occurrence that cantools reports, and when it is present."""

    name: str
    field: BitField
    path: tuple[MuxStep, ...]


def _winners(signals: list[Signal]) -> list[Signal]:
    """One signal per name, the one whose bits `cantools` reports.

    Real DBCs repeat names (Orion's `Blank`). cantools unpacks a node's big-endian
    signals in start-bit order and its little-endian ones in reverse, then keeps the
    last value per name: so the first little-endian occurrence wins if there is one,
    otherwise the last big-endian one. We report the same bits, scaled by that
    occurrence's own factor and offset.
    """
    chosen: dict[str, Signal] = {}
    for s in signals:
        prev = chosen.get(s.name)
        if prev is None or prev.byte_order == "big_endian":
            chosen[s.name] = s
    return [s for s in signals if chosen[s.name] is s]


class MessageLayout:
    """A message as data: the signals cantools reports (`reads`, in the order in which a
    later one overrides an earlier one of the same name) and its multiplexers (raw field
    and the path under which the multiplexer itself is present)."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.key = message_key(msg)
        self.reads: list[SignalRead] = []
        self.muxers: dict[str, tuple[BitField, tuple[MuxStep, ...]]] = {}
        self._children: dict[str, list[Signal]] = {}
        for s in msg.signals:
            if s.multiplexer_signal is not None:
                self._children.setdefault(s.multiplexer_signal, []).append(s)
        self._walk([s for s in msg.signals if s.multiplexer_signal is None], ())
        self.by_name: dict[str, list[SignalRead]] = {}
        for r in self.reads:
            self.by_name.setdefault(r.name, []).append(r)

    def _walk(self, signals: list[Signal], path: tuple[MuxStep, ...]) -> None:
        for s in _winners(signals):
            bf = bitfield(self.msg, s)
            if bf.shift >= 0:  # big-endian bits beyond msg.length have no aligned place
                self.reads.append(SignalRead(s.name, bf, path))
        for mux in signals:
            kids = self._children.get(mux.name)
            if not mux.is_multiplexer or not kids or mux.name in self.muxers:
                continue
            raw = replace(bitfield(self.msg, mux), scale=1, offset=0, float_fmt=None)
            if raw.shift < 0:
                continue
            self.muxers[mux.name] = (raw, path)
            groups: dict[frozenset[int], list[Signal]] = {}
            for k in kids:
                ids = frozenset(int(v) for v in k.multiplexer_ids or ())
                groups.setdefault(ids, []).append(k)
            for values, members in groups.items():
                self._walk(members, (*path, MuxStep(mux.name, values)))


def merge_paths(a: tuple[MuxStep, ...], b: tuple[MuxStep, ...]) -> tuple[MuxStep, ...] | None:
    """The path under which signals on both paths are present together, or None when
    no frame carries both (different branches of one multiplexer)."""
    out: list[MuxStep] = []
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            out.extend((a if i < len(a) else b)[i:])
            break
        if a[i].muxer != b[i].muxer:
            return None
        both = a[i].values & b[i].values
        if not both:
            return None
        out.append(MuxStep(a[i].muxer, both))
    return tuple(out)


def frame_bits(bits: int, big_endian: bool, length: int) -> int | None:
    """Bits of the integer a handler reads (`le`, or `be` aligned to the DBC's `length`)
    as the same bits of `int.from_bytes(frame[:8], "big")`; None past the 8th byte."""
    if big_endian:
        return bits << 8 * (8 - length) if length <= 8 else None
    return None if bits >> 64 else int.from_bytes(bits.to_bytes(8, "little"), "big")


@dataclass(frozen=True, slots=True)
class ReadBits:
    """The frame bits a generated handler reads, as bits of `int.from_bytes(frame[:8],
    "big")`: `always` whatever the multiplexer says (the multiplexer's own bits among
    them); with a multiplexer `mux` (the message's outermost), `by_value` gives the bits
    read besides `always` when its raw value is v. A frame whose bits under these masks
    equal the last frame's of its value does what that frame did (`read_bits` gives no
    multiplexer where frames of two values write one place). `whole`: every frame (of
    its value) writes all that frames of it write, so the last of several stands for
    them (none selects places by an `index:` or an inner multiplexer). Kernel filtering
    (receive: bcm) is built from it."""

    always: int
    mux: BitField | None = None
    length: int = 8  # the DBC length, which places the multiplexer's bits
    by_value: dict[int, int] = dataclasses.field(default_factory=dict)
    whole: bool = True

    def mux_bits(self, value: int | None = None) -> int:
        """The multiplexer's bits (its mask), or `value` placed in them."""
        if self.mux is None:
            return 0
        raw = self.mux.mask if value is None else value & self.mux.mask
        return frame_bits(raw << self.mux.shift, self.mux.big_endian, self.length) or 0

    def flat(self) -> int:
        """Every bit read, whatever the multiplexer says."""
        out = self.always
        for bits in self.by_value.values():
            out |= bits
        return out

    def union(self, other: ReadBits) -> ReadBits:
        """What two handlers of one frame read together (two packs, one id)."""
        whole = self.whole and other.whole
        if self.mux is None or other.mux != self.mux or self.length != other.length:
            return ReadBits(self.flat() | other.flat(), whole=whole)
        by = dict(self.by_value)
        for v, bits in other.by_value.items():
            by[v] = by.get(v, 0) | bits
        return ReadBits(self.always | other.always, self.mux, self.length, by, whole)


Emit = Callable[["Source", int], None]


@dataclass(frozen=True, slots=True)
class Item:
    """A piece of generated code and when it runs: only when every multiplexer on `path`
    has a listed value. `muxers` names multiplexers whose value the code itself reads
    (through `Source.mux_var`); each must be present wherever `path` holds. `key` is the
    profile key the code comes from: every line it emits says so in a comment."""

    key: str
    path: tuple[MuxStep, ...]
    emit: Emit
    muxers: tuple[str, ...] = ()


class Source:
    """One generated function's body: the lines (each tagged with the profile key it
    comes from), the constants it closes over, and the frame length its reads need."""

    def __init__(self, layout: MessageLayout) -> None:
        self.layout = layout
        self.limit = layout.msg.length  # reads past the DBC length get their own guard
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.min_bytes = 0
        self.uses: set[str] = set()  # "le" / "be": which frame integers the reads need
        self._key = ""
        self._n = 0
        self._mux_vars = {name: f"m{i}" for i, name in enumerate(layout.muxers)}
        # the frame bits each read covers, by the multiplexer values it runs under
        self._bits: dict[tuple[MuxStep, ...], int] = {}
        self._at: tuple[MuxStep, ...] = ()
        self._by_top = False  # the code under the outermost step writes by its value
        # a read whose value frames of several outermost multiplexer values write to the
        # same place (a signal outside the multiplexer, or under several of its values)
        self._shared = False
        self._selected: set[str] = set()  # the multiplexers read to choose what runs
        self.indexed = False  # a signal of the frame chooses where values go (`indexes`)
        self.unmasked = False  # read otherwise (bytes, beyond 8): every bit may count

    def tag(self, key: str) -> None:
        """Tag the lines emitted from now on with this profile key ("" for none)."""
        self._key = key

    def const(self, value: Any, hint: str = "k") -> str:
        self._n += 1
        name = f"_{hint}{self._n}"
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        text = "    " * indent + line
        if self._key:  # the profile key, where a traceback shows it
            text = f"{text.ljust(56)}  # {self._key}"
        self.lines.append(text)

    def read(self, bf: BitField, *, raw: bool = False, selects: bool = False,
             indexes: bool = False) -> str:
        """Expression for a field's value (with `raw`: its integer, sign-extended if
        signed, unscaled); the frame must then hold the field's bytes. `selects`: a
        multiplexer's value, which chooses what runs and is stored nowhere. `indexes`:
        a value that chooses where values go (`index:` cells, a DTC stream's code)."""
        self.indexed = self.indexed or indexes
        if raw:
            bf = replace(bf, float_fmt=None, scale=1, offset=0)
        self.min_bytes = max(self.min_bytes, bf.min_bytes)
        self.uses.add("be" if bf.big_endian else "le")
        bits = frame_bits(bf.mask << bf.shift, bf.big_endian, self.layout.msg.length)
        if bits is None:
            self.unmasked = True
        else:
            self._bits[self._at] = self._bits.get(self._at, 0) | bits
        if selects:
            self._selected.add(bf.name)
        elif not self._at or (len(self._at[0].values) > 1 and not self._by_top):
            self._shared = True
        return bf.expr("le", "be")

    @contextmanager
    def under(self, step: MuxStep, *, by_value: bool = False) -> Iterator[None]:
        """The code emitted inside runs only when `step` holds (its multiplexer has one
        of its values): what it reads is recorded as read for those values only.
        `by_value`: that code writes to a place chosen by the multiplexer's value (cells
        of a group), so frames of different values never write the same place."""
        outer, top = self._at, self._by_top
        self._at = (*outer, step)
        if not outer:
            self._by_top = by_value
        try:
            yield
        finally:
            self._at, self._by_top = outer, top

    def read_bits(self) -> ReadBits | None:
        """The bits the code emitted so far reads (None: it reads the frame otherwise)."""
        if self.unmasked:
            return None
        always = self._bits.get((), 0)
        tops = {path[0].muxer for path in self._bits if path}
        if len(tops) != 1:  # not multiplexed (or, never seen, two outermost muxers)
            out = 0
            for bits in self._bits.values():
                out |= bits
            return ReadBits(out, whole=not self._selected and not self.indexed)
        if self._shared:
            # The kernel compares a frame with the last frame of its own multiplexer
            # value. A value two groups write (a signal outside the multiplexer, or under
            # several of its values) is then stale whenever a frame repeats its group's
            # last one but not the value another group wrote since: one mask for all.
            out = 0
            for bits in self._bits.values():
                out |= bits
            return ReadBits(out, whole=False)
        muxer = tops.pop()
        by_value: dict[int, int] = {}
        for path, bits in self._bits.items():
            for v in path[0].values if path else ():
                by_value[v] = by_value.get(v, 0) | bits
        top = self.layout.muxers[muxer][0]
        return ReadBits(always, top, self.layout.msg.length, by_value,
                        self._selected <= {top.name} and not self.indexed)

    def mux_var(self, muxer: str) -> str:
        return self._mux_vars[muxer]

    def items(self, items: list[Item], indent: int, *, checked: bool = False,
              depth: int = 0) -> None:
        """Emit `items`, grouped under one test per multiplexer value set, each
        multiplexer read once. `checked`: a multiplexer the frame is too short to carry
        selects nothing (for decoders without a length check up front)."""
        here = [it for it in items if len(it.path) == depth]
        deeper = [it for it in items if len(it.path) > depth]
        needed = dict.fromkeys([*(it.path[depth].muxer for it in deeper),
                                *(m for it in here for m in it.muxers)])
        for name in needed:
            field, _ = self.layout.muxers[name]
            expr = self.read(field, selects=True)
            if checked:
                expr = f"{expr} if n >= {field.min_bytes} else None"
            self._key = f"multiplexer {name}"
            self.emit(indent, f"{self.mux_var(name)} = {expr}")
        for it in here:
            self._key = it.key
            start, outer, self.min_bytes = len(self.lines), self.min_bytes, 0
            it.emit(self, indent)
            if self.min_bytes > self.limit and not checked:
                # a signal running past the DBC length (a DBC error, seen in real files):
                # only frames long enough carry it; the rest of the message still decodes
                self.lines[start:] = ["    " + ln for ln in self.lines[start:]]
                self.lines.insert(start, "    " * indent + f"if n >= {self.min_bytes}:  # {it.key}")
                self.min_bytes = self.limit
            self.min_bytes = max(outer, self.min_bytes)
        self._key = ""
        branches: dict[MuxStep, list[Item]] = {}
        for it in deeper:
            branches.setdefault(it.path[depth], []).append(it)
        for step, group in branches.items():
            var = self.mux_var(step.muxer)
            if len(step.values) == 1:
                cond = f"{var} == {next(iter(step.values))}"
            else:
                cond = f"{var} in {self.const(step.values, 'S')}"
            self._key = f"multiplexer {step.muxer}"
            self.emit(indent, f"if {cond}:")
            self._key = ""
            before = len(self.lines)
            with self.under(step):
                self.items(group, indent + 1, checked=checked, depth=depth + 1)
            if len(self.lines) == before:
                self.emit(indent + 1, "pass")


def compile_source(text: str, filename: str, namespace: dict[str, Any]) -> None:
    """exec generated source, registered in `linecache` so tracebacks show its lines."""
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    exec(compile(text, filename, "exec"), namespace)


def where_failed(exc: BaseException) -> str:
    """`, at FILE line N: CODE` for the innermost generated line of a traceback (its
    comment names the profile key), or "" if the error is not in generated code."""
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if fr.filename.startswith("<") and fr.filename in linecache.cache:
            return f", at {fr.filename} line {fr.lineno}: {(fr.line or '').strip()}"
    return ""


def compile_message(msg: Message) -> Callable[[bytes], dict[str, float | int]]:
    """One function decoding every signal of `msg` present in a frame, from the same
    layout and generator as production's handlers.

    Equals `db.decode_message(id, data, decode_choices=False)`, except that a short
    frame yields the signals it fully carries instead of raising, and a multiplexer
    value the DBC does not list yields only the signals outside that multiplexer.
    Signal names reach the function through a constant tuple, never through its source.
    """
    layout = MessageLayout(msg)
    body = Source(layout)
    names = body.const(tuple(r.name for r in layout.reads), "N")

    def item(i: int, r: SignalRead) -> Item:
        def emit(g: Source, ind: int) -> None:
            g.emit(ind, f"if n >= {r.field.min_bytes}:")
            g.emit(ind + 1, f"out[{names}[{i}]] = {g.read(r.field)}")
        return Item(r.name, r.path, emit)

    body.items([item(i, r) for i, r in enumerate(layout.reads)], 1, checked=True)
    lines = [
        "def decode(data):",
        "    n = _len(data)",
        "    le = _fb(data, 'little')",
        "    be = _fb(data, 'big')",
        f"    if n < {msg.length}:",
        f"        be <<= ({msg.length} - n) * 8",
        f"    elif n > {msg.length}:",
        f"        be >>= (n - {msg.length}) * 8",
        "    out = {}",
        *body.lines,
        "    return out",
    ]
    namespace: dict[str, Any] = {"__builtins__": {}, "_fb": int.from_bytes, "_len": len,
                                 "_unpack": unpack_float, **body.consts}
    compile_source("\n".join(lines) + "\n", f"<decode {message_key(msg):#x} {msg.name}>",
                   namespace)
    fn: Callable[[bytes], dict[str, float | int]] = namespace["decode"]
    return fn
