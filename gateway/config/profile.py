"""BMS profiles: YAML -> `Profile`, every problem collected with its fix."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from gateway.config.limits import MAX_CELLS, topic_segment_problem
from gateway.config.paths import BUILTIN_DBC, resolve_file
from gateway.config.polling import id_offset_shift, isotp_requests, poll_requests
from gateway.config.problems import Problem, Reader, nearest
from gateway.config.types import (
    CHECKSUM_METHODS,
    UNIT_FACTORS,
    BmsFault,
    CellSource,
    DtcStream,
    FrameCheck,
    Gate,
    Profile,
    ValueSpec,
)
from gateway.config.yamlsafe import read_yaml
from gateway.model import FIELD_BY_NAME, SEVERITIES

MAX_EXPR_CHARS = 1000  # a profile's `expr:`; real ones are a few dozen characters


_VALUE_KEYS = {"message", "signal", "expr", "const", "scale", "offset", "unit", "invert",
               "valid", "map", "bit", "values", "sources", "fresh_s", "sentinel"}


def _int_list(r: Reader, key: str, obj: Any, what: str) -> tuple[int, ...]:
    if obj is None:
        return ()
    items = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        r.bad(key, f"{what} must be whole numbers (raw values as in the frame)",
              "e.g. [0xFFFF] or [255, 254]")
        return ()
    return tuple(items)


def _sources_spec(r: Reader, key: str, spec: dict[str, Any]) -> ValueSpec | None:
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


def _value_spec(r: Reader, key: str, obj: Any, default_message: str | None) -> ValueSpec | None:
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


def _cell_layout_ok(r: Reader, k: str, spec: dict[str, Any], kind: str) -> bool:
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


def _cell_sources(r: Reader, key: str, obj: Any) -> tuple[CellSource, ...]:
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


def _entries(r: Reader, key: str, obj: Any, example: str,
             ) -> list[tuple[str, dict[str, Any]]]:
    """A profile list of mappings as (key, mapping); a problem if it is not a list."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        r.bad(key, "must be a list", example)
        return []
    return [(f"{key}[{i}]", r.mapping(item, f"{key}[{i}]")) for i, item in enumerate(obj)]


def _gates(r: Reader, obj: Any) -> tuple[Gate, ...]:
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


def _checks(r: Reader, obj: Any) -> tuple[FrameCheck, ...]:
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


def _dtcs(r: Reader, obj: Any) -> tuple[DtcStream, ...]:
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


_PROFILE_KEYS = {"name", "description", "dbc", "fields", "cells", "faults", "poll", "gates",
                 "dtcs", "checks",
                 "cell_count", "stale_after_s", "extras", "notes", "chemistry", "isotp",
                 "poll_id_offset_shift"}
CHEMISTRIES = ("lfp", "nmc", "nca", "lmo", "lto", "sodium", "other")


def load_profile(path: Path, problems: list[Problem]) -> Profile | None:
    data = read_yaml(path, problems)
    if data is None:
        return None
    r = Reader(str(path), problems)
    top = r.mapping(data, "(top level)")
    r.known(top, "", _PROFILE_KEYS)
    dbc_list = top.get("dbc", [])
    if isinstance(dbc_list, str):
        dbc_list = [dbc_list]
    dbcs = tuple(resolve_file(path.parent, str(d), BUILTIN_DBC) for d in dbc_list or [])
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
    polls = poll_requests(r, top.get("poll"))
    cc = r.int_(top, "", "cell_count", None, lo=1, hi=MAX_CELLS)
    return Profile(
        name=str(top.get("name", path.stem)), path=path,
        description=str(top.get("description", "")), dbc=dbcs, fields=fields, cells=cells,
        faults=tuple(faults), poll=polls, cell_count=cc, gates=gates, dtcs=dtcs, checks=checks,
        stale_after_s=r.num(top, "", "stale_after_s", None, lo=0.1), extras=extras,
        chemistry=parse_chemistry(r, top, "chemistry"),
        isotp=isotp_requests(r, top.get("isotp")),
        poll_id_offset_shift=id_offset_shift(r, top),
    )


def parse_chemistry(r: Reader, obj: dict[str, Any], key: str) -> str | None:
    chem = r.str_(obj, "", "chemistry", None)
    if chem is not None and chem.lower() not in CHEMISTRIES:
        r.bad(key, f"unknown chemistry {chem!r}",
              nearest(chem.lower(), CHEMISTRIES) or f"one of {', '.join(CHEMISTRIES)}")
        return None
    return chem.lower() if chem else None

