"""`bms-gateway watch`: a live terminal dashboard of every pack (rich).

Whatever the source, the dashboard is fed the gateway's own MQTT payloads: from a
broker (`--mqtt`, any gateway), or from a `Pipeline` run in this process on a log
(`--log`) or on the live buses of a config; `WatchStore` keeps the newest state, cells,
availability and faults per pack, and `render(view, width, height)` is a pure function
of the resulting `ViewModel`, so tests render it to a string.

Cells: a compact grid (`12*3.301▆▲`: number, `*` when balancing, voltage, a bar whose
height is the cell's place between the pack's min and max, `▲` max / `▼` min) when it
fits the terminal; otherwise a dense mode of one glyph per cell, 16 to a group, with the
min and max cells drawn as `▼`/`▲` and balancing cells on a blue background. Both colour
each cell by its distance from the pack median (not the mean, which one runaway cell
drags along, tinting all the others): green within `ok_mv`, yellow within `warn_mv`,
red beyond. When the screen is short, the detail is cut in this order:
faults list, compact grid, cell grid, extra lines, then whole packs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.backoff import backoff
from gateway.commands.export import parse_ts
from gateway.errors import GatewayError, require_extra
from gateway.model import PackState, Publication, Value, iso_ts
from gateway.publish.sink import ImmediateSink

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from gateway.config import GatewayConfig
    from gateway.runtime.runtime import Runtime

GLYPHS = "▁▂▃▄▅▆▇█"
MAX_MARK, MIN_MARK, BAL_MARK = "▲", "▼", "*"
DENSE_GROUP = 16
REFRESH_S = 0.25


class WatchError(GatewayError):
    """The dashboard cannot start (rich missing, bad URL, unreadable log)."""


def require_rich() -> None:
    require_extra("rich", "watch", "watch", "rich>=13")


# ------------------------------------------------------------------ view model


# What any client on the broker may publish under our topics is hostile input for the
# dashboard too: numbers must be finite and of a size a pack can have, lists and the
# number of packs are bounded, so one bad payload can neither crash the view nor grow it.
MAX_SLOTS = 1024
MAX_PACKS = 256
_NUMBER_LIMIT = 1e9


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) and abs(f) < _NUMBER_LIMIT else None


def _no_constant(name: str) -> object:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class FaultView:
    code: str
    severity: str
    since: float | None
    message: str
    cell: int | None = None
    sensor: int | None = None


@dataclass(frozen=True, slots=True)
class PackView:
    pack_id: str
    values: dict[str, Value] = field(default_factory=dict)  # the state payload
    cell_v: tuple[float | None, ...] = ()
    cell_t: tuple[float | None, ...] = ()
    balancing: tuple[bool | None, ...] = ()
    availability: str | None = None  # "online" / "offline" / None (not seen)
    faults: tuple[FaultView, ...] = ()
    updated: float | None = None  # the state's ts

    def num(self, name: str) -> float | None:
        return _number(self.values.get(name))

    @classmethod
    def from_payloads(cls, pack_id: str, state: dict[str, Any] | None,
                      cells: dict[str, Any] | None, faults: list[Any] | None,
                      availability: str | None) -> PackView:
        """Build from the MQTT payloads (decoded JSON) of one pack."""
        state = state or {}
        cells = cells or {}

        def floats(xs: object) -> tuple[float | None, ...]:
            if not isinstance(xs, list):
                return ()
            return tuple(_number(x) for x in xs[:MAX_SLOTS])

        bal = cells.get("balancing")
        fv = []
        for f in (faults or [])[:MAX_SLOTS]:
            if not isinstance(f, dict):
                continue
            fv.append(FaultView(
                code=str(f.get("code", "?")), severity=str(f.get("severity", "")),
                since=parse_ts(f.get("since")), message=str(f.get("message") or ""),
                cell=f["cell"] if isinstance(f.get("cell"), int) else None,
                sensor=f["sensor"] if isinstance(f.get("sensor"), int) else None))
        return cls(
            pack_id=pack_id,
            values={k: v for k, v in state.items() if k not in ("ts", "pack_id")},
            cell_v=floats(cells.get("voltages_v")), cell_t=floats(cells.get("temps_c")),
            balancing=tuple(b if isinstance(b, bool) else None for b in bal[:MAX_SLOTS])
            if isinstance(bal, list) else (),
            availability=availability, faults=tuple(fv), updated=parse_ts(state.get("ts")))

    @classmethod
    def from_pack_state(cls, st: PackState, *, faults: list[dict[str, Any]] | None = None,
                        online: bool | None = None) -> PackView:
        """Build from a live `PackState` (call `derive()` first for the derived fields)."""
        avail = None if online is None else ("online" if online else "offline")
        return cls.from_payloads(st.pack_id, dict(st.snapshot()),
                                 st.cells_snapshot() if st.cell_v or st.cell_t else None,
                                 faults, avail)


@dataclass(frozen=True, slots=True)
class ViewModel:
    packs: tuple[PackView, ...]
    now: float  # fault ages and "updated" are relative to this (frame time for logs)
    source: str = ""
    note: str = ""  # e.g. "end of log", "broker disconnected"
    ok_mv: float = 5.0
    warn_mv: float = 20.0


class WatchStore:
    """The newest retained payload per pack and topic, as a subscriber keeps them."""

    LEAVES = ("state", "cells", "availability", "faults")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.data: dict[str, dict[str, Any]] = {}
        self.bad = 0

    def apply(self, topic: str, payload: bytes) -> bool:
        """Take one message; True if it was one of ours (and changed the view)."""
        head, _, rest = topic.rpartition("/")
        prefix, _, pack = head.rpartition("/")
        if rest not in self.LEAVES or prefix != self.prefix or not pack:
            return False
        if pack not in self.data and len(self.data) >= MAX_PACKS:
            self.bad += 1
            return False
        slot = self.data.setdefault(pack, {})
        if not payload:  # a cleared retained topic
            slot.pop(rest, None)
            return True
        text = payload.decode(errors="replace")
        if rest == "availability":
            slot[rest] = text[:16]
            return True
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            self.bad += 1
            return False
        if not isinstance(value, list if rest == "faults" else dict):
            self.bad += 1
            return False
        slot[rest] = value
        return True

    def view(self, now: float, source: str = "", note: str = "", *, ok_mv: float = 5.0,
             warn_mv: float = 20.0) -> ViewModel:
        packs = []
        for pack in sorted(self.data):
            d = self.data[pack]
            st, ce, fa = d.get("state"), d.get("cells"), d.get("faults")
            packs.append(PackView.from_payloads(
                pack, st if isinstance(st, dict) else None, ce if isinstance(ce, dict) else None,
                fa if isinstance(fa, list) else None, d.get("availability")))
        return ViewModel(tuple(packs), now, source, note, ok_mv, warn_mv)


# ------------------------------------------------------------------ rendering


def fmt_age(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _n(v: float | None, fmt: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


_SEV_SHORT = {"info": "INFO", "warning": "WARN", "alarm": "ALRM", "critical": "CRIT"}
_SEV_STYLE = {"info": "cyan", "warning": "yellow", "alarm": "bold red",
              "critical": "bold white on red"}


@dataclass(frozen=True, slots=True)
class _Detail:
    grid: str  # "auto" (compact if it fits), "dense", "none"
    faults: int  # fault lines shown (then "+N more")
    extra: bool  # temperature/limits line


_LEVELS = (_Detail("auto", 8, True), _Detail("auto", 3, True), _Detail("dense", 3, True),
           _Detail("dense", 1, True), _Detail("dense", 1, False), _Detail("none", 1, False),
           _Detail("none", 0, False))


def _line(*parts: str | tuple[str, str]) -> Text:
    from rich.text import Text

    t = Text(no_wrap=True, overflow="ellipsis")
    for p in parts:
        if isinstance(p, tuple):
            t.append(p[0], style=p[1])
        else:
            t.append(p)
    return t


def _cell_style(v: float | None, ref: float, vm: ViewModel) -> str:
    if v is None:
        return "dim"
    dev = abs(v - ref) * 1000.0
    if dev <= vm.ok_mv:
        return "green"
    if dev <= vm.warn_mv:
        return "yellow"
    return "bold red"


class _Cells:
    """Per-pack cell statistics shared by the summary line and both grid modes."""

    def __init__(self, p: PackView) -> None:
        self.v = p.cell_v
        known = [(x, i) for i, x in enumerate(p.cell_v) if x is not None]
        self.n = len(p.cell_v)
        self.known = len(known)
        self.lo = min(known) if known else None  # (voltage, index): first of equals
        self.hi = max(known, key=lambda k: (k[0], -k[1])) if known else None
        self.mean = sum(x for x, _ in known) / len(known) if known else 0.0
        # colours measure from the median: one runaway cell must not tint all the others
        self.ref = statistics.median(x for x, _ in known) if known else 0.0
        self.bal = [i for i, b in enumerate(p.balancing) if b]
        self.width = len(str(self.n)) if self.n else 1

    def glyph(self, x: float | None) -> str:
        if x is None:
            return "·"
        if self.lo is None or self.hi is None or self.hi[0] - self.lo[0] < 1e-9:
            return GLYPHS[3]
        f = (x - self.lo[0]) / (self.hi[0] - self.lo[0])
        return GLYPHS[min(len(GLYPHS) - 1, max(0, int(f * len(GLYPHS))))]

    def mark(self, i: int) -> str:
        if self.hi is not None and i == self.hi[1]:
            return MAX_MARK
        if self.lo is not None and i == self.lo[1]:
            return MIN_MARK
        return ""

    def compact_cols(self, inner: int) -> int:
        return max(1, inner // (self.width + 8))

    def compact(self, inner: int, vm: ViewModel) -> list[Text]:
        cols = self.compact_cols(inner)
        bal = set(self.bal)
        rows = []
        for start in range(0, self.n, cols):
            parts: list[str | tuple[str, str]] = []
            for i in range(start, min(self.n, start + cols)):
                x = self.v[i]
                style = _cell_style(x, self.ref, vm)
                mark = self.mark(i)
                parts.append((f"{i + 1:>{self.width}}", "bold" if mark else "dim"))
                parts.append((BAL_MARK, "bold magenta") if i in bal else " ")
                parts.append(("  -  " if x is None else f"{x:.3f}", style))
                parts.append((self.glyph(x), style))
                parts.append((mark, "bold reverse") if mark else " ")
            rows.append(_line(*parts))
        return rows

    def dense_per_row(self, inner: int) -> int:
        groups = max(1, (inner - self.width - 1 + 1) // (DENSE_GROUP + 1))
        return groups * DENSE_GROUP

    def dense(self, inner: int, vm: ViewModel) -> list[Text]:
        per = self.dense_per_row(inner)
        bal = set(self.bal)
        rows = []
        for start in range(0, self.n, per):
            parts: list[str | tuple[str, str]] = [(f"{start + 1:>{self.width}} ", "dim")]
            for i in range(start, min(self.n, start + per)):
                if i > start and (i - start) % DENSE_GROUP == 0:
                    parts.append(" ")
                x = self.v[i]
                style = _cell_style(x, self.ref, vm)
                mark = self.mark(i)
                if i in bal:
                    style += " on blue"
                parts.append((mark or self.glyph(x), style + (" bold" if mark else "")))
            rows.append(_line(*parts))
        return rows


def _pack_lines(p: PackView, vm: ViewModel, inner: int, d: _Detail) -> list[Text]:
    lines: list[Text] = []
    if not p.values and not p.cell_v:
        return [_line(("waiting for data…", "dim"))]
    soc = p.num("soc_pct")
    bar_w = 20
    filled = 0 if soc is None else round(max(0.0, min(100.0, soc)) / 100 * bar_w)
    soc_style = "red" if soc is not None and soc < 15 else (
        "yellow" if soc is not None and soc < 30 else "green")
    cur = p.num("current_a")
    if cur is None:
        cur_txt, cur_style = "-", "dim"
    elif cur > 0.05:
        cur_txt, cur_style = f"{cur:+.1f} A charging", "cyan"
    elif cur < -0.05:
        cur_txt, cur_style = f"{cur:+.1f} A discharging", "magenta"
    else:
        cur_txt, cur_style = f"{cur:+.1f} A idle", "dim"
    lines.append(_line("SoC ", ("█" * filled, soc_style), ("░" * (bar_w - filled), "dim"),
                       (f" {_n(soc, '5.1f', ' %')}", "bold"),
                       f"  {_n(p.num('voltage_v'), '.2f', ' V')}  ", (cur_txt, cur_style),
                       f"  {_n(p.num('power_w'), '+.0f', ' W')}"))
    if d.extra:
        tmin, tmax = p.num("temp_min_c"), p.num("temp_max_c")
        parts: list[str | tuple[str, str]] = [
            f"Temp {_n(tmin, '.1f')}…{_n(tmax, '.1f', ' °C')}"]
        if (soh := p.num("soh_pct")) is not None:
            parts.append(f"  SoH {soh:.0f} %")
        if (cyc := p.num("cycles")) is not None:
            parts.append(f"  {cyc:.0f} cycles")
        for name, label in (("charge_enabled", "CHG"), ("discharge_enabled", "DSG"),
                            ("contactor_closed", "K")):
            v = p.values.get(name)
            if isinstance(v, bool):
                parts.append("  ")
                parts.append((f"{label}{'✓' if v else '✗'}", "green" if v else "red"))
        lines.append(_line(*parts))
        lim = [p.num(n) for n in ("charge_current_limit_a", "charge_voltage_limit_v",
                                  "discharge_current_limit_a", "discharge_voltage_limit_v")]
        if any(x is not None for x in lim):
            lines.append(_line(
                ("Limits ", ""), "charge ", (_n(lim[0], ".1f", " A"), "cyan"), " ≤ ",
                (_n(lim[1], ".2f", " V"), "cyan"), "   discharge ",
                (_n(lim[2], ".1f", " A"), "magenta"), " ≥ ", (_n(lim[3], ".2f", " V"),
                                                              "magenta")))
    c = _Cells(p)
    if c.known:
        assert c.lo is not None and c.hi is not None
        parts = [f"Cells {c.n}  ", (f"{MIN_MARK}{c.lo[0]:.3f} #{c.lo[1] + 1}", "bold"), "  ",
                 (f"{MAX_MARK}{c.hi[0]:.3f} #{c.hi[1] + 1}", "bold"),
                 f"  avg {c.mean:.3f}  Δ {(c.hi[0] - c.lo[0]) * 1000:.0f} mV"]
        if c.bal:
            shown = " ".join(f"#{i + 1}" for i in c.bal[:4])
            rest = f" +{len(c.bal) - 4}" if len(c.bal) > 4 else ""
            parts.append((f"  {BAL_MARK}bal {shown}{rest}", "magenta"))
        lines.append(_line(*parts))
        grid = d.grid
        if grid == "auto":
            grid = "compact"
        if grid == "compact":
            lines.extend(c.compact(inner, vm))
        elif grid == "dense":
            lines.extend(c.dense(inner, vm))
    else:
        cv_lo, cv_hi = p.num("cell_v_min"), p.num("cell_v_max")
        if cv_lo is not None or cv_hi is not None:
            lines.append(_line(f"Cells {MIN_MARK}{_n(cv_lo, '.3f')} {MAX_MARK}{_n(cv_hi, '.3f')}"))
    faults = sorted(p.faults, key=lambda f: (f.since or 0.0), reverse=True)
    if faults and d.faults == 0:
        lines.append(_line((f"{len(faults)} active fault{'s' * (len(faults) > 1)}",
                            "bold red")))
    elif faults:
        show = faults if len(faults) <= d.faults else faults[:d.faults - 1] if d.faults > 1 \
            else []
        for f in show:
            age = fmt_age(vm.now - f.since) if f.since is not None else "?"
            sev = _SEV_SHORT.get(f.severity, f.severity.upper()[:4])
            lines.append(_line((f"{sev:<4}", _SEV_STYLE.get(f.severity, "")),
                               f" {age:>7}  ", (f.code, "bold"), f"  {f.message}"))
        if len(show) < len(faults):
            more = len(faults) - len(show)
            lines.append(_line((f"+{more} more fault{'s' * (more > 1)}"
                                if show else f"{more} active faults", "bold red")))
    else:
        lines.append(_line(("no active faults", "green dim")))
    return lines


def _compact_fits(p: PackView, inner: int, max_rows: int) -> bool:
    c = _Cells(p)
    rows = math.ceil(c.n / c.compact_cols(inner)) if c.n else 0
    return rows <= max_rows


def _brief(p: PackView) -> Text:
    soc, v = p.num("soc_pct"), p.num("voltage_v")
    avail = p.availability or "?"
    if not p.values and not p.cell_v:
        return _line((p.pack_id, "bold"), f" {avail}  ", ("waiting for data…", "dim"))
    return _line((f"{p.pack_id}", "bold"), f" {avail}  SoC {_n(soc, '.1f', ' %')}  ",
                 f"{_n(v, '.2f', ' V')}  {_n(p.num('current_a'), '+.1f', ' A')}  ",
                 (f"{len(p.faults)} faults", "bold red") if p.faults else ("ok", "green"))


def _title(p: PackView, vm: ViewModel) -> Text:
    avail = p.availability
    dot = ("● online", "bold green") if avail == "online" else (
        ("○ offline", "bold red") if avail == "offline" else ("? no availability", "dim"))
    state = p.values.get("bms_state")
    parts: list[str | tuple[str, str]] = [" ", (p.pack_id, "bold"), " ", dot]
    if isinstance(state, str):
        parts += [" · ", (state, "bold")]
    if p.updated is not None:
        parts.append(f" · {fmt_age(vm.now - p.updated)} ago")
    parts.append(" ")
    return _line(*parts)


def _legend(vm: ViewModel) -> Text:
    return _line(" ", ("■", "green"), f"±{vm.ok_mv:g} ", ("■", "yellow"), f"±{vm.warn_mv:g} ",
                 ("■", "bold red"), f">{vm.warn_mv:g} mV from median  ",
                 f"{MAX_MARK}max {MIN_MARK}min {BAL_MARK}bal ")


def render(vm: ViewModel, width: int, height: int) -> RenderableType:
    """The whole screen for `vm`, at most `width` x `height` cells (a pure function)."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel

    width = max(40, width)
    height = max(6, height)
    inner = width - 4  # borders + one column of padding each side
    when = iso_ts(vm.now)[:19].replace("T", " ") if math.isfinite(vm.now) else ""
    header = _line(("bms-gateway watch", "bold"), f" · {vm.source}" if vm.source else "",
                   f" · {when} UTC" if when else "",
                   (f" · {vm.note}", "yellow") if vm.note else "", ("  Ctrl-C quits", "dim"))
    if not vm.packs:
        return Group(header, _line(("no packs seen yet…", "dim")))
    budget = height - 1  # the header
    chosen: list[list[Text]] | None = None
    for d in _LEVELS:
        per_pack = []
        for p in vm.packs:
            dd = d
            if d.grid == "auto":
                fixed = len(_pack_lines(p, vm, inner, _Detail("none", d.faults, d.extra)))
                room = budget - 2 * len(vm.packs) - fixed
                if not _compact_fits(p, inner, max(0, room // len(vm.packs))):
                    dd = _Detail("dense", d.faults, d.extra)
            per_pack.append(_pack_lines(p, vm, inner, dd))
        if sum(len(ls) + 2 for ls in per_pack) <= budget:
            chosen = per_pack
            break
    parts: list[RenderableType] = [header]
    if chosen is None:  # not even one line per pack fits: brief lines, then cut
        briefs = [_brief(p) for p in vm.packs]
        if len(briefs) > budget:
            more = len(briefs) - budget + 1
            briefs = [*briefs[:budget - 1], _line((f"… {more} more packs", "dim"))]
        parts.extend(briefs)
        return Group(*parts)
    for p, ls in zip(vm.packs, chosen, strict=True):
        has_cells = any(x is not None for x in p.cell_v)
        parts.append(Panel(Group(*ls), title=_title(p, vm), title_align="left",
                           subtitle=_legend(vm) if has_cells else None, subtitle_align="right",
                           box=box.ROUNDED, padding=(0, 1), width=width,
                           border_style="red" if p.faults else (
                               "green" if p.availability == "online" else "dim")))
    return Group(*parts)


def render_text(vm: ViewModel, width: int = 80, height: int = 24) -> str:
    """`render` to plain text, as tests and screenshots see it."""
    from rich.console import Console

    con = Console(record=True, width=width, height=height, force_terminal=False,
                  color_system=None, file=io.StringIO())
    con.print(render(vm, width, height))
    return con.export_text()


# ------------------------------------------------------------------ sources


class WatchSink(ImmediateSink):
    """The dashboard as the runtime's sink: each snapshot goes into the store, as a
    subscriber would keep it; events need no line of their own (the faults topic lists
    what is active)."""

    name = "watch"

    def __init__(self, store: WatchStore) -> None:
        super().__init__()
        self.store = store

    def publish(self, pub: Publication) -> None:
        self.store.apply(pub.topic, pub.payload)
        self.count += 1

    def event(self, seq: int, topic: str, payload: bytes) -> bool:
        return True


class _Screen:
    """A `rich.live.Live` full-screen display redrawn from a view callback."""

    def __init__(self, view: Callable[[], ViewModel]) -> None:
        from rich.console import Console

        self.console = Console()
        self.view = view
        self.live: Any = None

    def __enter__(self) -> _Screen:
        from rich.live import Live

        self.live = Live(console=self.console, screen=True, auto_refresh=False,
                         redirect_stderr=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def draw(self) -> None:
        w, h = self.console.size
        self.live.update(render(self.view(), w, h), refresh=True)


def _runtime(cfg: GatewayConfig, store: WatchStore) -> Runtime:
    """A private runtime: the config's pipeline, the dashboard as its only sink."""
    from gateway.runtime.pipeline import Pipeline
    from gateway.runtime.runtime import Runtime

    return Runtime(cfg, Pipeline(cfg), sink=WatchSink(store), outbox_path=":memory:")


async def watch_log(cfg: GatewayConfig, log_path: str | Path, *, speed: float | None,
                    ok_mv: float = 5.0, warn_mv: float = 20.0) -> None:
    """Replay a log through the pipeline in this process; no broker involved."""
    from gateway.source.logs import Pacer, SourceStats, read_log

    store = WatchStore(cfg.mqtt.topic_prefix)
    stats = SourceStats()
    # the pipeline first, as replay: a profile problem (exit 3) outranks the log's (exit 1)
    rt = _runtime(cfg, store)
    pipeline = rt.pipeline
    note = ""
    name = Path(log_path).name
    last_draw = 0.0

    def view() -> ViewModel:
        now = pipeline.clock if math.isfinite(pipeline.clock) else time.time()
        return store.view(now, f"log {name} x{speed:g}" if speed else f"log {name}", note,
                          ok_mv=ok_mv, warn_mv=warn_mv)

    async with rt:
        batches = read_log(log_path, stats)  # a LogError before the screen is taken
        with _Screen(view) as screen:
            def draw() -> None:
                nonlocal last_draw
                screen.draw()
                last_draw = time.monotonic()

            def now_and_then() -> None:
                if time.monotonic() - last_draw >= REFRESH_S:
                    draw()

            await rt.play(batches, Pacer(speed), on_pause=draw, on_batch=now_and_then)
            note = f"end of log ({stats.frames} frames)"
            screen.draw()
            await asyncio.Event().wait()  # hold the last picture until Ctrl-C


async def watch_bus(cfg: GatewayConfig, *, ok_mv: float = 5.0, warn_mv: float = 20.0) -> None:
    """Read the config's live buses into a private pipeline (publishes nothing)."""
    store = WatchStore(cfg.mqtt.topic_prefix)
    rt = _runtime(cfg, store)

    def view() -> ViewModel:
        lost = [s.cfg.name for s in rt.sources if s.lost]
        note = f"bus lost: {', '.join(lost)}" if lost else ""
        buses = ", ".join(f"{b.interface}:{b.channel}" for b in cfg.buses)
        return store.view(time.time(), f"bus {buses}", note, ok_mv=ok_mv, warn_mv=warn_mv)

    with _Screen(view) as screen:
        async with rt:
            rt.start_sources()
            while True:
                rt.pipeline.tick(time.time())
                rt.ship()
                screen.draw()
                await asyncio.sleep(REFRESH_S)


def parse_mqtt_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """`mqtt[s]://[user[:password]@]host[:port]` -> host, port, tls, user, password."""
    from urllib.parse import unquote, urlsplit

    from gateway.config import MqttConfig

    try:  # urlsplit itself refuses some, e.g. "mqtt://[::1" (no closing bracket)
        parts = urlsplit(url)
        user = unquote(parts.username) if parts.username else None
        pw = unquote(parts.password) if parts.password else None
        bare = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        host, port, tls = MqttConfig(url=bare).host_port
    except ValueError:
        msg = f"bad MQTT url {url!r}: use mqtt://[user:pass@]host[:1883] or mqtts://host[:8883]"
        raise WatchError(msg) from None
    return host, port, tls, user, pw


async def watch_mqtt(url: str, prefix: str = "bms", *, ok_mv: float = 5.0,
                     warn_mv: float = 20.0, ca_file: str | None = None) -> None:
    """Subscribe to any gateway's retained topics on any broker."""
    import os
    import ssl

    import aiomqtt

    host, port, tls, user, pw = parse_mqtt_url(url)
    ctx = ssl.create_default_context(cafile=ca_file) if tls else None
    store = WatchStore(prefix)
    note = "connecting…"
    p = prefix.rstrip("/")
    topics = [f"{p}/+/{leaf}" for leaf in WatchStore.LEAVES]

    def view() -> ViewModel:
        return store.view(time.time(), f"{url.rpartition('@')[2]} {p}/#", note,
                          ok_mv=ok_mv, warn_mv=warn_mv)

    async def redraw(screen: _Screen) -> None:
        while True:
            screen.draw()
            await asyncio.sleep(REFRESH_S)

    with _Screen(view) as screen:
        task = asyncio.create_task(redraw(screen), name="watch.redraw")
        try:
            attempt = 0
            while True:
                try:
                    async with aiomqtt.Client(host, port, username=user, password=pw,
                                              tls_context=ctx,
                                              identifier=f"bms-watch-{os.getpid()}") as client:
                        for t in topics:
                            await client.subscribe(t, qos=0)
                        attempt = 0
                        note = ""
                        async for msg in client.messages:
                            payload = msg.payload if isinstance(msg.payload, bytes) else str(
                                msg.payload or "").encode()
                            store.apply(str(msg.topic), payload)
                except aiomqtt.MqttError as e:
                    attempt += 1
                    note = f"broker: {e}; retrying"
                    await asyncio.sleep(backoff(attempt, cap=10.0))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["FaultView", "PackView", "ViewModel", "WatchError", "WatchSink", "WatchStore", "fmt_age",
           "parse_mqtt_url", "render", "render_text", "require_rich", "watch_bus",
           "watch_log", "watch_mqtt"]
