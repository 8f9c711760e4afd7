"""A profile's requests: `poll:` frames, `isotp:` requests and `poll_id_offset_shift`.

gateway/source/poll.py sends and matches them; what they mean is in docs/profiles.md."""

from __future__ import annotations

import math
from typing import Any

from gateway.config.problems import Reader
from gateway.config.types import CellBlock, IsoTpRequest, PollRequest

MAX_ID_SHIFT = 28  # a shifted id_offset must stay inside a 29-bit CAN id


def poll_requests(r: Reader, obj: Any) -> tuple[PollRequest, ...]:
    polls: list[PollRequest] = []
    for i, p in enumerate(obj or []):
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
    return tuple(polls)


def id_offset_shift(r: Reader, top: dict[str, Any]) -> int:
    shift = r.int_(top, "", "poll_id_offset_shift", 0, lo=0) or 0
    if shift > MAX_ID_SHIFT:
        r.bad("poll_id_offset_shift", f"must be a whole number 0..{MAX_ID_SHIFT}, got {shift!r}",
              "the number of bits the pack's id_offset moves left in request ids, e.g. 8")
        return 0
    return shift


def isotp_requests(r: Reader, obj: Any) -> tuple[IsoTpRequest, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list) or not all(isinstance(x, dict) for x in obj):
        r.bad("isotp", "must be a list of ISO-TP requests (mappings)",
              "see docs/profiles.md, e.g. [{request_id: 0x79B, response_id: 0x7BB, ...}]")
        return ()
    return tuple(req for i, item in enumerate(obj)
                 if (req := _isotp(r, f"isotp[{i}]", item)) is not None)


_ISOTP_KEYS = {"request_id", "response_id", "request", "period_s", "timeout_s", "extended",
               "padding", "block_size", "st_min", "cells"}
_BLOCK_KEYS = {"kind", "offset", "count", "bytes", "scale", "signed", "byte_order", "first"}


def _int(v: Any, lo: int, hi: int) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        return None
    return v


def _num(v: Any) -> float | None:
    # NaN passes every `<` test and inf overflows a timer: neither is a number of seconds
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _isotp(r: Reader, key: str, obj: dict[str, Any]) -> IsoTpRequest | None:
    r.known(obj, key, _ISOTP_KEYS)
    ext = obj.get("extended", False)
    top = 0x1FFFFFFF if ext else 0x7FF
    req_id, resp_id = _int(obj.get("request_id"), 0, top), _int(obj.get("response_id"), 0, top)
    if req_id is None or resp_id is None:
        r.bad(key, f"request_id and response_id must be CAN ids 0..{top:#x}",
              "e.g. request_id: 0x79B, response_id: 0x7BB (extended: true for 29-bit ids)")
        return None
    try:
        request = bytes.fromhex(str(obj.get("request", "")))
    except ValueError:
        request = b""
    if not 2 <= len(request) <= 8 or request[0] >> 4 != 0 or (request[0] & 0xF) != len(request) - 1:
        r.bad(f"{key}.request", f"{obj.get('request')!r} is not an ISO-TP single frame",
              "hex bytes with the length first, e.g. '022102' (2 bytes: 21 02)")
        return None
    period = _num(obj.get("period_s", 1.0))
    timeout = _num(obj.get("timeout_s", 1.0))
    if period is None or period < 0.05 or timeout is None or timeout <= 0:
        r.bad(f"{key}.period_s",
              "period_s (>= 0.05) and timeout_s (> 0) must be numbers of seconds",
              "e.g. period_s: 2, timeout_s: 1.0")
        return None
    padding, bs, st = (_int(obj.get(k, d), 0, 255) for k, d in
                       (("padding", 0xFF), ("block_size", 0), ("st_min", 0)))
    if padding is None or bs is None or st is None:
        r.bad(key, "padding, block_size and st_min must be bytes (0..255)",
              "e.g. padding: 0xFF, block_size: 0, st_min: 0")
        return None
    cells = None
    if obj.get("cells") is not None:
        cells = _cell_block(r, f"{key}.cells", obj["cells"])
        if cells is None:
            return None
    return IsoTpRequest(key, req_id, resp_id, request, period, timeout, bool(ext), padding, bs,
                        st, cells)


def _cell_block(r: Reader, key: str, c: Any) -> CellBlock | None:
    if not isinstance(c, dict):
        r.bad(key, "must be a mapping", "e.g. {offset: 2, count: 96, bytes: 2, scale: 0.001}")
        return None
    r.known(c, key, _BLOCK_KEYS)
    kind = c.get("kind", "voltages")
    off, count, width = (_int(c.get(k, d), lo, hi) for k, d, lo, hi in
                         (("offset", 0, 0, 4095), ("count", None, 1, 1024),
                          ("bytes", 2, 1, 4)))
    scale = _num(c.get("scale", 1.0))
    first = _int(c.get("first", 0), 0, 1023)
    order = c.get("byte_order", "big_endian")
    if (kind not in ("voltages", "temps") or off is None or count is None or width is None
            or scale is None or first is None or order not in ("big_endian", "little_endian")):
        r.bad(key, "needs kind (voltages|temps), offset, count, bytes (1-4), scale, "
              "byte_order (big_endian|little_endian)",
              "e.g. {kind: voltages, offset: 2, count: 96, bytes: 2, scale: 0.001}")
        return None
    return CellBlock(kind, off, count, width, scale, bool(c.get("signed", False)),
                     order == "big_endian", first)
