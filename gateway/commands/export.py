"""`decode` and `plot`: a recorded log as the time series a subscriber would have seen.

`records()` drives the synchronous `Pipeline` straight from the log (no broker, no
asyncio) and turns what it publishes into `Record`s: one per state, cells,
availability and faults publication, and one per fault event. It is the same policy and
the same bytes as `bms-gateway replay` sends to MQTT; events pass through an in-memory
`Outbox` so they carry the same `seq` (their `event_id` has a random part, as on MQTT).

Output formats:

* jsonl: one line per record, `{"topic": ..., "kind": ..., "payload": ...}`; `kind` is
  one of `state`, `cells`, `availability`, `faults` (the retained list of active
  faults) and `event`.
* csv: one row per state publication (`ts`, `pack_id`, then the `FIELDS` columns), and
  the fault events in a second CSV (`<out>.events.csv` by default). Cells and extras
  are only in jsonl: their columns are not known before the log has been read.

With `every` (`--every-frame-time S`) state and cells are resampled instead: every S
seconds of frame time the last published payload of each pack is emitted again, with
`ts` set to the sample time (sample and hold: what a subscriber held at that moment).
Availability, faults and events are still emitted as they happen.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

from gateway.config import GatewayConfig
from gateway.errors import require_extra
from gateway.model import FIELDS, Publication, iso_ts
from gateway.publish.outbox import Outbox
from gateway.runtime.pipeline import Pipeline
from gateway.source.logformats import LineFormat
from gateway.source.logs import SourceStats, read_log, sniff_format

log = logging.getLogger("gateway.export")

Kind = Literal["state", "cells", "availability", "faults", "event"]
KINDS: tuple[Kind, ...] = ("state", "cells", "availability", "faults", "event")
STATE_COLUMNS = ("ts", "pack_id", *(f.name for f in FIELDS))
EVENT_COLUMNS = ("ts", "pack_id", "seq", "event_id", "code", "severity", "state", "source",
                 "value", "limit", "cell", "sensor", "message")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    kind: Kind
    pack_id: str
    payload: Any  # the decoded JSON payload; availability is the plain string
    clock: float  # frame time at which the pipeline produced it

    def line(self) -> str:
        return json.dumps({"topic": self.topic, "kind": self.kind, "payload": self.payload},
                          separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Summary:
    stats: SourceStats = field(default_factory=SourceStats)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))


def parse_ts(text: object) -> float | None:
    """Epoch seconds from our ISO 8601 `ts`/`since` strings (None if absent or bad)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class _Classifier:
    """Topic -> (kind, pack) for the topics the pipeline publishes; per-value topics and
    anything else are not part of the export."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.kinds: dict[str, tuple[Kind, str]] = {}
        for pack in pipeline.packs:
            pid, pub = pack.live.state.pack_id, pack.publisher
            self.kinds[pub.t_state] = ("state", pid)
            self.kinds[pub.t_cells] = ("cells", pid)
            self.kinds[pub.t_avail] = ("availability", pid)
            self.kinds[pub.t_faults] = ("faults", pid)
            self.kinds[pack.events_topic] = ("event", pid)

    def record(self, pub: Publication, clock: float) -> Record | None:
        found = self.kinds.get(pub.topic)
        if found is None:
            return None
        kind, pid = found
        text = pub.payload.decode()
        payload = text if kind == "availability" else json.loads(text)
        return Record(pub.topic, kind, pid, payload, clock)


def records(cfg: GatewayConfig, log_path: str | Path, *, every: float | None = None,
            summary: Summary | None = None,
            progress: Callable[[int], None] | None = None,
            line_format: LineFormat | None = None, start: float | None = None) -> Iterator[Record]:
    """Replay `log_path` through the pipeline; yield what a subscriber would receive."""
    if every is not None and not (math.isfinite(every) and every > 0):
        msg = f"resampling interval must be a positive number of seconds, got {every!r}"
        raise ValueError(msg)
    summary = summary or Summary()
    pipeline = Pipeline(cfg)
    classify = _Classifier(pipeline)
    # raises LogError before anything is yielded
    batches = read_log(log_path, summary.stats, line_format=line_format, start=start)
    # Acked at once, as in stdout mode, so the bounds never drop anything.
    outbox = Outbox.open(":memory:", max_events=cfg.outbox.max_events,
                         max_age_s=cfg.outbox.max_age_s, gateway_id=cfg.gateway_id)
    held: dict[str, Record] = {}  # resampling: last state/cells record per topic
    next_sample = float("-inf")

    def produced() -> Iterator[Record]:
        out = pipeline.take()
        clock = pipeline.clock
        events = [x for x in out if not isinstance(x, Publication)]
        stored = iter(outbox.append(events) if events else ())
        for item in out:
            if isinstance(item, Publication):
                pub = item
            else:
                seq, topic, payload = next(stored)
                outbox.ack(seq)
                pub = Publication(topic, payload, retain=False, qos=1)
            rec = classify.record(pub, clock)
            if rec is None:
                continue
            if every is not None and rec.kind in ("state", "cells"):
                held[rec.topic] = rec
                continue
            yield rec

    def sample(t: float) -> Iterator[Record]:
        stamp = iso_ts(t)
        for rec in held.values():
            yield Record(rec.topic, rec.kind, rec.pack_id, {**rec.payload, "ts": stamp}, t)

    def counted(it: Iterable[Record]) -> Iterator[Record]:
        for rec in it:
            summary.counts[rec.kind] += 1
            yield rec

    try:
        for batch in batches:
            if every is None:
                pipeline.feed_log(batch)
                yield from counted(produced())
            else:
                start = 0
                for i, fr in enumerate(batch):
                    if fr[0] < next_sample:
                        continue
                    if next_sample == float("-inf"):
                        next_sample = fr[0]
                    pipeline.feed_log(batch[start:i])
                    start = i
                    yield from counted(produced())
                    while fr[0] >= next_sample:
                        yield from counted(sample(next_sample))
                        next_sample += every
                pipeline.feed_log(batch[start:])
                yield from counted(produced())
            if progress is not None:
                progress(len(batch))
        pipeline.finish()
        yield from counted(produced())
        if every is not None and held and pipeline.clock > next_sample - every:
            yield from counted(sample(pipeline.clock))
        # what replay says at its end: the packs go offline (retained)
        yield from counted(r for p in pipeline.offline()
                           if (r := classify.record(p, pipeline.clock)) is not None)
    finally:
        outbox.close()


# ------------------------------------------------------------------ writers


def _cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def write_jsonl(recs: Iterable[Record], out: IO[str]) -> None:
    for rec in recs:
        out.write(rec.line())
        out.write("\n")


def write_csv(recs: Iterable[Record], out: IO[str], events: IO[str] | None) -> int:
    """States to `out`, events to `events`; returns how many events had nowhere to go."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(STATE_COLUMNS)
    ew = None
    if events is not None:
        ew = csv.writer(events, lineterminator="\n")
        ew.writerow(EVENT_COLUMNS)
    lost = 0
    for rec in recs:
        if rec.kind == "state":
            w.writerow([_cell(rec.payload.get(c)) for c in STATE_COLUMNS])
        elif rec.kind == "event":
            if ew is None:
                lost += 1
            else:
                ew.writerow([_cell(rec.payload.get(c)) for c in EVENT_COLUMNS])
    return lost


def events_path(out: Path) -> Path:
    """`run.csv` -> `run.events.csv`."""
    return out.with_name(f"{out.stem}.events{out.suffix or '.csv'}")


# ------------------------------------------------------------------ progress


def count_lines(path: Path) -> int | None:
    """Lines of a text log (candump, SLCAN): the progress total; None for other formats."""
    try:
        if sniff_format(path) == "pycan":
            return None
        n = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
        return n
    except OSError:
        return None


class Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, path: Path, *, enabled: bool | None = None) -> None:
        self.path = path
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
        except ImportError:
            return None
        total = count_lines(self.path)
        self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.path.name, total=total)
        bar, task = self._bar, self._task
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# ------------------------------------------------------------------ plot


def _require_matplotlib() -> Any:
    matplotlib = require_extra("matplotlib", "plot", "plot", "matplotlib>=3.7")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(slots=True)
class Series:
    """One pack's time series, gathered from the records."""

    pack_id: str
    t: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    cells_t: list[float] = field(default_factory=list)
    cells: list[list[float]] = field(default_factory=list)
    events: list[tuple[float, str, str, str]] = field(default_factory=list)  # ts, state, code, sev

    def add(self, rec: Record) -> None:
        p = rec.payload
        if rec.kind == "state":
            ts = parse_ts(p.get("ts"))
            if ts is None:
                return
            self.t.append(ts)
            for name in ("voltage_v", "current_a", "soc_pct", "temp_min_c", "temp_max_c"):
                v = p.get(name)
                self.values.setdefault(name, []).append(
                    float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                    else math.nan)
        elif rec.kind == "cells":
            ts = parse_ts(p.get("ts"))
            volts = p.get("voltages_v") or []
            if ts is None or not volts:
                return
            self.cells_t.append(ts)
            self.cells.append([float(v) if isinstance(v, int | float) else math.nan
                               for v in volts])
        elif rec.kind == "event":
            ts = parse_ts(p.get("ts"))
            if ts is not None:
                where = f" #{p['cell']}" if "cell" in p else (
                    f" T{p['sensor']}" if "sensor" in p else "")
                self.events.append((ts, str(p.get("state")), f"{p.get('code')}{where}",
                                    str(p.get("severity"))))


def collect(recs: Iterable[Record], pack: str | None = None) -> Series:
    series: dict[str, Series] = {}
    for rec in recs:
        if pack is not None and rec.pack_id != pack:
            continue
        series.setdefault(rec.pack_id, Series(rec.pack_id)).add(rec)
    if pack is not None:
        return series.get(pack) or Series(pack)
    if not series:
        return Series("?")
    return next(iter(series.values()))


_SEV_COLOUR = {"info": "tab:blue", "warning": "tab:orange", "alarm": "tab:red",
               "critical": "darkred"}


def plot(series: Series, out: Path, *, title: str = "") -> None:
    """Pack voltage, current, SoC, temperatures, a cell heatmap and fault markers."""
    plt = _require_matplotlib()
    import numpy as np
    from matplotlib.colors import SymLogNorm

    if not series.t:
        msg = f"pack {series.pack_id}: no state was published from this log: nothing to plot"
        raise ValueError(msg)
    t0 = series.t[0]
    rel = np.array(series.t) - t0
    has_cells = len(series.cells_t) >= 2
    rows = 5 if has_cells else 4
    fig, axes = plt.subplots(rows, 1, sharex=True, figsize=(11, 2.0 * rows + 1.2),
                             gridspec_kw={"height_ratios": [1, 1, 1, 1, 2][:rows]},
                             layout="constrained")
    v = series.values

    def line(ax: Any, name: str, label: str, colour: str) -> None:
        ax.plot(rel, v.get(name, [math.nan] * len(rel)), color=colour, lw=1.2, label=label,
                drawstyle="steps-post")

    line(axes[0], "voltage_v", "pack voltage", "tab:blue")
    axes[0].set_ylabel("V")
    line(axes[1], "current_a", "current (+ = charging)", "tab:purple")
    axes[1].axhline(0, color="0.6", lw=0.8)
    axes[1].set_ylabel("A")
    line(axes[2], "soc_pct", "SoC", "tab:green")
    axes[2].set_ylabel("%")
    axes[2].set_ylim(0, 100)
    line(axes[3], "temp_max_c", "temperature max", "tab:red")
    line(axes[3], "temp_min_c", "temperature min", "tab:cyan")
    axes[3].set_ylabel("°C")
    for ax in axes[:4]:
        ax.legend(loc="upper left", fontsize="small", frameon=False)
        ax.grid(alpha=0.3)
    if has_cells:
        ax = axes[4]
        width = max(len(c) for c in series.cells)
        grid = np.full((len(series.cells), width), np.nan)
        for i, c in enumerate(series.cells):
            grid[i, :len(c)] = c
        # from the median, not the mean: one runaway cell must not tint all the others
        dev = (grid - np.nanmedian(grid, axis=1, keepdims=True)) * 1000.0
        lim = max(20.0, float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 20.0)
        ct = np.array(series.cells_t) - t0
        edges = np.append(ct, ct[-1] + (ct[-1] - ct[-2]))
        # linear within the watch's green band (5 mV), logarithmic beyond: one runaway
        # cell must not wash out the few-mV spread of the others
        norm = SymLogNorm(linthresh=5.0, vmin=-lim, vmax=lim, base=10)
        mesh = ax.pcolormesh(edges, np.arange(width + 1) + 0.5, dev.T, cmap="coolwarm",
                             norm=norm, shading="flat")
        ticks = [t for t in (-500, -100, -20, -5, 0, 5, 20, 100, 500) if abs(t) <= lim]
        bar = fig.colorbar(mesh, ax=ax, label="cell - pack median (mV)", pad=0.01, ticks=ticks)
        bar.ax.set_yticklabels([f"{t:+d}" if t else "0" for t in ticks])
        ax.set_ylabel("cell")
    axes[-1].set_xlabel(f"seconds since {iso_ts(t0)}")
    # grey where the pack was silent (comm_lost): the flat lines there are held values
    lost: float | None = None
    for ts, state, code, _sev in [*series.events, (series.t[-1], "cleared", "comm_lost", "")]:
        if code == "comm_lost" and state == "raised":
            lost = ts
        elif code == "comm_lost" and lost is not None:
            for ax in axes:
                ax.axvspan(lost - t0, ts - t0, color="0.88", zorder=0)
            lost = None
    top = axes[0]
    for ts, state, code, sev in series.events:
        x = ts - t0
        colour = _SEV_COLOUR.get(sev, "black") if state == "raised" else "tab:green"
        style = "--" if state == "raised" else ":"
        for ax in axes:
            ax.axvline(x, color=colour, ls=style, lw=1.0, alpha=0.8)
        top.annotate(f"{'▲' if state == 'raised' else '▼'} {code}", (x, 0.97),
                     xycoords=("data", "axes fraction"), xytext=(2, 0),
                     textcoords="offset points", rotation=90, fontsize=7, color=colour,
                     va="top", ha="left",
                     bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                           "alpha": 0.7})
    fig.suptitle(title or f"pack {series.pack_id}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


__all__ = ["EVENT_COLUMNS", "STATE_COLUMNS", "Progress", "Record", "Series", "Summary",
           "collect", "events_path", "parse_ts", "plot", "records", "write_csv",
           "write_jsonl"]
