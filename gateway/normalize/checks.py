"""The frames a handler drops, and counts, before it writes anything: `checks:` a frame
whose checksum (sum8, xor8, CRC-8 SAE J1850) or rolling counter is wrong; `gates:` frames
that arrive while a state signal says the BMS sends placeholders. Each entry is checked
against the DBC, then emitted at the top of its message's handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config import FrameCheck, Gate, Problem, nearest
from gateway.decode.dbc import SignalRead, Source

if TYPE_CHECKING:
    from gateway.normalize.compiler import Compiler


def xor8(data: bytes) -> int:
    x = 0
    for b in data:
        x ^= b
    return x


def _crc8_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ 0x1D) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table.append(c)
    return table


_CRC8 = _crc8_table()


def crc8_sae_j1850(data: bytes) -> int:
    """CRC-8 SAE J1850 (poly 0x1D, init 0xFF, final xor 0xFF), as AUTOSAR E2E profile 1."""
    c = 0xFF
    for b in data:
        c = _CRC8[c ^ b]
    return c ^ 0xFF


# A gate: (state message, state signal, values that shut it, ignored messages or None:
# all but the state message)
GateSpec = tuple[str, SignalRead, frozenset[int], list[str] | None]

# The names the generated test calls, for the handler's namespace.
CHECK_FUNCTIONS: dict[str, Callable[[bytes], int]] = {
    "_sum": sum, "_xor": xor8, "_crc8": crc8_sae_j1850}


def compile_check(c: Compiler, chk: FrameCheck) -> None:
    """Check one `checks:` entry against its message and register it for the handler."""
    msg = c.message(chk.key, chk.message)
    if msg is None:
        return
    cs = ctr = None
    if chk.checksum is not None:
        cs = c.read(f"{chk.key}.checksum", msg, chk.checksum)
        if cs is None:
            return
        if cs.path or cs.field.length != 8 or \
                (cs.field.shift % 8 if not cs.field.big_endian else
                 (msg.length * 8 - cs.field.shift - 8) % 8):
            c.problems.append(Problem(c.file, f"{chk.key}.checksum",
                                      f"{chk.checksum!r} is not one whole byte of every "
                                      "frame", "checksums are 8-bit, byte-aligned, not "
                                      "multiplexed"))
            return
    if chk.counter is not None:
        ctr = c.read(f"{chk.key}.counter", msg, chk.counter)
        if ctr is None:
            return
        if ctr.path:
            c.problems.append(Problem(c.file, f"{chk.key}.counter",
                                      f"{chk.counter!r} is multiplexed",
                                      "a rolling counter must be in every frame"))
            return
    c.msgs.setdefault(msg.name, [])
    c.checks[msg.name] = (chk, cs, ctr)


def compile_gate(c: Compiler, gate: Gate) -> None:
    """`gates`: while a state signal has given values, listed messages are ignored."""
    got = c.message_read(gate.key, gate.message, gate.signal)
    if got is None:
        return
    msg, rd = got
    if rd.path:
        c.problems.append(Problem(c.file, f"{gate.key}.signal",
                                  f"{gate.signal!r} is multiplexed: a gate needs a signal "
                                  "every frame of its message carries",
                                  "choose an unmultiplexed state signal"))
        return
    sig = next(s for s in msg.signals if s.name == rd.name)
    by_name = {str(v): int(k) for k, v in (sig.choices or {}).items()}
    values: set[int] = set()
    for v in gate.values:
        if isinstance(v, int):
            values.add(v)
        elif v in by_name:
            values.add(by_name[v])
        else:
            c.problems.append(Problem(c.file, f"{gate.key}.values",
                                      f"signal {sig.name!r} has no choice {v!r}",
                                      nearest(v, by_name) or "use the raw number"))
            return
    ignore: list[str] | None = None
    if gate.ignore is not None:
        ignore = []
        for name in gate.ignore:
            m = c.message(f"{gate.key}.ignore", name)
            if m is None:
                return
            ignore.append(m.name)
    c.msgs.setdefault(msg.name, [])
    c.gate_specs.append((msg.name, rd, frozenset(values), ignore))


def emit_gates(g: Source, name: str, specs: list[GateSpec]) -> None:
    """Message `name`'s part of the gates: set a gate's flag from its state signal, or
    drop the frame while a gate over it is shut."""
    gated = []
    for k, (gmsg, rd, values, ignore) in enumerate(specs):
        if gmsg == name:
            g.emit(1, f"G[{k}] = {g.read(rd.field, raw=True)} in "
                   f"{g.const(values, 'gate')}  # gates[{k}]: state")
        if (ignore is None and gmsg != name) or (ignore is not None and name in ignore):
            gated.append(k)
    if gated:
        g.emit(1, f"if {' or '.join(f'G[{k}]' for k in gated)}:  # validity gate")
        g.emit(2, "CNT.gated += 1")
        g.emit(2, "return")


def emit_checks(g: Source, key: int, length: int, chk: FrameCheck, cs: SignalRead | None,
                ctr: SignalRead | None) -> None:
    """The test of frame key `key` (a message of `length` bytes): checksum `cs`, then
    rolling counter `ctr`."""
    k = chk.key
    if cs is not None:
        bf = cs.field
        pos = bf.shift // 8 if not bf.big_endian else (length * 8 - bf.shift - 8) // 8
        fid = key & 0x1FFFFFFF
        id_bytes = fid.to_bytes(4 if key & 0x80000000 else 2, "big").lstrip(b"\0") or b"\0"
        g.tag(k)
        got = g.read(bf, raw=True)
        if chk.method == "crc8_sae_j1850":
            want = f"_crc8(data[:{pos}] + data[{pos} + 1:])"
        else:
            op = "^" if chk.method == "xor8" else "+"
            extra: list[int | str] = []
            if chk.with_id:
                extra.append(sum(id_bytes) if op == "+" else xor8(id_bytes))
            if chk.with_length:
                extra.append("n")
            agg = "_sum" if op == "+" else "_xor"
            want = f"{agg}(data[:{pos}] + data[{pos} + 1:])"
            for e in extra:
                want = f"({want} {op} {e})"
            want = f"{want} & 0xFF"
        g.unmasked = True  # the checksum covers every byte
        g.emit(1, f"if {got} != {want}:")
        g.emit(2, "CNT.bad_checksum += 1")
        g.emit(2, "return")
    if ctr is not None:
        g.tag(k)
        mod = 1 << ctr.field.length
        step = chk.max_step or max(1, mod // 2)
        slot = g.const([None], "counter")
        # a repeated counter counts (a stuck sender), and a frame fed twice is not one
        # fed once: receive: bcm delivers every frame and feeds none again
        g.unmasked = True
        g.emit(1, f"c = {g.read(ctr.field, raw=True)}")
        g.emit(1, f"p = {slot}[0]")
        g.emit(1, f"{slot}[0] = c")
        g.emit(1, f"if p is not None and not 0 < (c - p) % {mod} <= {step}:")
        g.emit(2, "CNT.bad_counter += 1")
        g.emit(2, "return")
    g.tag("")
