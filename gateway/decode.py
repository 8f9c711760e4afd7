"""Decode stage: DBC loading with readable errors, and signal extraction compiled once.

cantools parses the DBC; at run time we do not call it per frame. For each signal the
profile uses we precompute where its bits sit in the frame read as one integer
(little-endian signals from `int.from_bytes(data, "little")`, big-endian ones from
`int.from_bytes(data, "big")`), so extraction is a shift and a mask. The normalize
stage turns these extraction recipes into one Python function per message. Property
tests hold every recipe equal to `cantools` `decode_message` on random payloads.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cantools
from cantools.database import Database
from cantools.database.can import Message, Signal

EXTENDED_FLAG = 0x80000000  # key bit for 29-bit identifiers, as DBC files write them


class DbcError(Exception):
    """A DBC file could not be loaded; the message says which file, where, and what to do."""


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
               "or move them under the message that has the signal")
    elif "overlapping" in detail or "duplicate" in detail.lower():
        fix = "two signals share bits; the gateway loads DBCs non-strictly, so this should not happen: report it"
    return f"{path}{where}: cantools cannot load this DBC: {first}. Fix: {fix}"


def load_dbc(path: str | Path) -> Database:
    """Load a DBC non-strictly (real DBCs overlap signals and reuse names)."""
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
        raise DbcError(_explain_dbc_error(p, text, e)) from e
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



# Imported here rather than at the head of the module so that this addition stays a
# self-contained block at the end of the file (other work edits the head).
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402


def compile_message(msg: Message) -> Callable[[bytes], dict[str, float | int]]:
    """One generated function decoding every signal of `msg` present in a frame.

    Equals `db.decode_message(id, data, decode_choices=False)`, except that a short
    frame yields the signals it fully carries instead of raising, and a multiplexer
    value the DBC does not list yields only the signals outside that multiplexer.
    Multiplexer values are compared raw (as DBC files write them); cantools compares
    the scaled value, which differs only for a scaled multiplexer. Signal names reach
    the function through a constant tuple, never through its source text.
    """
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

    names: list[str] = []
    id_sets: list[frozenset[int]] = []
    children: dict[str, list[Signal]] = {}
    for s in msg.signals:
        if s.multiplexer_signal is not None:
            children.setdefault(s.multiplexer_signal, []).append(s)
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
    ]

    def emit_node(signals: list[Signal], ind: str, depth: int) -> None:
        for s in _winners(signals):
            bf = bitfield(msg, s)
            if bf.shift < 0:  # big-endian bits beyond msg.length: no aligned place
                continue
            names.append(s.name)
            lines.append(f"{ind}if n >= {bf.min_bytes}:")
            lines.append(f"{ind}    out[_N[{len(names) - 1}]] = {bf.expr('le', 'be')}")
        for mux in signals:
            kids = children.get(mux.name)
            if not mux.is_multiplexer or not kids:
                continue
            raw = replace(bitfield(msg, mux), scale=1, offset=0, float_fmt=None)
            if raw.shift < 0:
                continue
            # Group mux values by the exact set of signals they select, so each
            # branch is one cantools codec node (extended multiplexing allows
            # ranges and signals shared between values).
            groups: dict[tuple[int, ...], set[int]] = {}
            for value in sorted({v for k in kids for v in (k.multiplexer_ids or ())}):
                members = tuple(i for i, k in enumerate(kids) if value in (k.multiplexer_ids or ()))
                groups.setdefault(members, set()).add(value)
            var = f"m{depth}"
            lines.append(f"{ind}if n >= {raw.min_bytes}:")
            lines.append(f"{ind}    {var} = {raw.expr('le', 'be')}")
            keyword = "if"
            for members, values in groups.items():
                id_sets.append(frozenset(values))
                lines.append(f"{ind}    {keyword} {var} in _S[{len(id_sets) - 1}]:")
                before = len(lines)
                emit_node([kids[i] for i in members], ind + "        ", depth + 1)
                if len(lines) == before:
                    lines.append(f"{ind}        pass")
                keyword = "elif"

    emit_node([s for s in msg.signals if s.multiplexer_signal is None], "    ", 0)
    lines.append("    return out")
    namespace: dict[str, Any] = {
        "__builtins__": {},
        "_fb": int.from_bytes,
        "_len": len,
        "_unpack": unpack_float,
        "_N": tuple(names),
        "_S": tuple(id_sets),
    }
    exec(compile("\n".join(lines), f"<decode {message_key(msg):#x}>", "exec"), namespace)
    fn: Callable[[bytes], dict[str, float | int]] = namespace["decode"]
    return fn
