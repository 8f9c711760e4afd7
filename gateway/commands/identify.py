"""`bms-gateway identify LOG`: which profile fits a capture?

Every shipped profile (and, with `--dbc`, every profile again on the user's DBCs) runs
the capture through the same pipeline the daemon uses. A profile scores by what it
makes of the traffic:

* **plausible**: of the pack values it published, the share that survived the range and
  cross-signal checks (gateway/faults/plausibility.py: pack voltage against the cells, against
  the BMS's own limits, min against max...). A layout that does not fit the BMS gives
  numbers that contradict each other;
* **complete**: the share of the values the profile maps that the capture filled;
* **lengths**: the share of its frames whose length is the DBC message's length
  (random or foreign traffic on the same ids rarely matches);
* **traffic**: the share of the capture's frames it explains, which ranks two
  otherwise equal profiles.

score = 100 x plausible x lengths x (0.6 complete + 0.25 ids seen + 0.15 traffic).
Below `FITS_AT` nothing fits, and the command says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, available_profiles, load_config
from gateway.decode.dbc import DbcError, load_dbc, message_key
from gateway.model import FIELD_INDEX, FIELDS
from gateway.normalize.compiler import DbcCache
from gateway.runtime.pipeline import Pipeline
from gateway.source.logformats import LineFormat
from gateway.source.logs import Frame, SourceStats, read_log

FITS_AT = 50.0  # a score below this: the profile does not explain the capture
MAX_FRAMES = 500_000  # enough for a minute of a busy bus; bounds time and memory
# fields every BMS profile is judged on (when it maps them)
_IDENTITY = ("cell_count", "cell_v_min_id", "cell_v_max_id", "cell_v_avg", "cell_v_delta",
             "power_w", "balancing_active")


@dataclass(slots=True)
class Fit:
    profile: str
    score: float
    dbc: list[str]
    own_dbc: list[str] = field(default_factory=list)  # given with --dbc
    frames: int = 0  # frames of the capture on ids the profile decodes
    ids_seen: int = 0
    ids_used: int = 0
    values: int = 0  # pack values published at the end
    mapped: int = 0  # pack values the profile maps
    implausible: int = 0  # values dropped as implausible
    length_ok: float = 1.0
    steady: float = 1.0
    cells: int = 0
    cell_v_avg: float | None = None
    voltage_v: float | None = None
    soc_pct: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["score"] = round(self.score, 1)
        d["length_ok"] = round(self.length_ok, 3)
        d["steady"] = round(self.steady, 3)
        return d


def read_frames(path: Path, limit: int = MAX_FRAMES, line_format: LineFormat | None = None
                ) -> tuple[list[Frame], SourceStats]:
    stats = SourceStats()
    frames: list[Frame] = []
    for batch in read_log(path, stats, line_format=line_format, start=0.0):
        frames.extend(batch)
        if len(frames) >= limit:
            del frames[limit:]
            break
    frames.sort(key=lambda f: f[0])
    return frames, stats


def _config(tmp: Path, profile: str, dbc: Sequence[Path]) -> Path:
    p = tmp / f"{profile}-{len(dbc)}.yaml"
    extra = (f", dbc: [{', '.join(json.dumps(str(d)) for d in dbc)}], dbc_lenient: true"
             if dbc else "")
    p.write_text("gateway_id: identify\nlog_level: error\n"
                 f"state_dir: {json.dumps(str(tmp / 'state'))}\n"
                 "can: {interface: virtual, channel: identify}\n"
                 f"packs:\n  - {{id: pack, profile: {json.dumps(profile)}{extra}}}\n",
                 encoding="utf-8")
    return p


def _lengths(dbc_paths: Iterable[Path], cache: DbcCache | None) -> dict[int, int]:
    out: dict[int, int] = {}
    for d in dbc_paths:
        try:
            db = cache.get(str(d)) if cache is not None else load_dbc(d)
        except DbcError:
            continue
        for m in db.messages:
            out.setdefault(message_key(m), m.length)
    return out


def score_profile(profile: str, frames: list[Frame], ids: Counter[int], tmp: Path,
                  dbc: Sequence[Path] = (), cache: DbcCache | None = None) -> Fit | None:
    """Run the capture through one profile; None if it cannot load (e.g. foreign DBC)."""
    try:
        cfg = load_config(_config(tmp, profile, dbc), mqtt_url="-")
        pipe = Pipeline(cfg, cache=cache)
    except ConfigError:
        return None
    pack = pipe.packs[0]
    pc = pack.live
    used = set(pc.handlers)
    fit = Fit(profile, 0.0, [str(d) for d in cfg.packs[0].profile.dbc], [str(d) for d in dbc])
    fit.ids_used = len(used)
    fit.ids_seen = sum(1 for k in used if k in ids)
    fit.frames = sum(ids[k] for k in used)
    if not fit.frames:
        fit.notes.append("none of its messages is in the capture")
        return fit
    lengths = _lengths(cfg.packs[0].profile.dbc, cache)
    good = sum(1 for _, k, data, _ in frames if k in used and len(data) == lengths.get(k, -1))
    fit.length_ok = good / fit.frames
    fit.steady = steadiness(frames, used)
    pipe.feed([f for f in frames if f[1] in used], 0)
    pipe.finish()
    pipe.take()
    st = pc.state
    st.derive()
    mapped = [i for i, m in enumerate(st.mapped) if m and FIELDS[i].name not in _IDENTITY]
    bad = pc.implausible_counts()
    fit.implausible = sum(bad.values())
    bad_fields = {n for n in bad if n in FIELD_INDEX}
    fit.mapped = len(mapped) + (1 if pc.cfg.profile.cells.get("voltages") else 0)
    have = [i for i in mapped if st.values[i] is not None and FIELDS[i].name not in bad_fields]
    known = [c for c in st.cell_v if c is not None]
    fit.cells = len(known)
    fit.cell_v_avg = round(sum(known) / len(known), 4) if known else None
    fit.values = len(have) + (1 if fit.cells else 0)
    fit.voltage_v = _num(st.get("voltage_v"))
    fit.soc_pct = _num(st.get("soc_pct"))
    if cells_bad := bad.get("cell_voltage", 0):
        bad_fields.add("cell_voltage")
        fit.notes.append(f"{cells_bad} cell voltages out of range")
    if pack.impl_reason:
        fit.notes.append(pack.impl_reason)
    for name in sorted(bad_fields - {"cell_voltage"}):
        fit.notes.append(f"{name}: {bad[name]} implausible")
    judged = fit.values + len(bad_fields)
    plausible = fit.values / judged if judged else 0.0
    complete = fit.values / fit.mapped if fit.mapped else 0.0
    seen = fit.ids_seen / fit.ids_used if fit.ids_used else 0.0
    traffic = fit.frames / max(1, sum(ids.values()))
    fit.score = 100 * plausible * fit.length_ok * fit.steady * (
        0.6 * complete + 0.25 * seen + 0.15 * traffic)
    if fit.steady < 0.5:
        fit.notes.append(f"its frames change erratically ({100 * fit.steady:.0f} % steady)")
    if fit.length_ok < 0.9:
        fit.notes.append(f"{100 * (1 - fit.length_ok):.0f} % of its frames have another "
                         "length than the DBC says")
    return fit


def steadiness(frames: Iterable[Frame], used: set[int]) -> float:
    """Share of consecutive frames of one id that differ in at most a quarter of their
    bits. A BMS's values move slowly (multiplexed cells of one pack are alike too); noise
    or another device's frames on the same ids flip half the bits. 1.0 when no id of
    the profile was seen twice: nothing to judge."""
    last: dict[int, bytes] = {}
    pairs = steady = 0
    for _, k, data, _ in frames:
        if k not in used:
            continue
        prev = last.get(k)
        last[k] = data
        if prev is None or len(prev) != len(data) or not data:
            continue
        pairs += 1
        flipped = (int.from_bytes(prev, "big") ^ int.from_bytes(data, "big")).bit_count()
        if flipped <= max(8, len(data) * 2):
            steady += 1
    return steady / pairs if pairs else 1.0


def _num(v: object) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def dbc_coverage(path: Path, ids: Counter[int]) -> Fit:
    """A DBC on its own: how much of the traffic it names (no pack values to judge)."""
    fit = Fit(f"dbc:{path.name}", 0.0, [str(path)])
    try:
        db = load_dbc(path, lenient=True)
    except DbcError as e:
        fit.notes.append(str(e))
        return fit
    keys = {message_key(m) for m in db.messages}
    fit.ids_used = len(keys)
    fit.ids_seen = sum(1 for k in keys if k in ids)
    fit.frames = sum(ids[k] for k in keys)
    fit.notes.append(f"explains {100 * fit.frames / max(1, sum(ids.values())):.1f} % of the "
                     "frames; no profile maps it, so its values are not judged")
    return fit


def identify(log: Path, dbcs: Sequence[Path] = (), *, profiles: Sequence[str] | None = None,
             line_format: LineFormat | None = None) -> tuple[list[Fit], SourceStats]:
    """Every candidate, best first (profiles; then profiles on each given DBC)."""
    frames, stats = read_frames(log, line_format=line_format)
    ids: Counter[int] = Counter(k for _, k, _, _ in frames)
    fits: list[Fit] = []
    names = list(profiles) if profiles is not None else available_profiles()
    cache = DbcCache()
    with tempfile.TemporaryDirectory(prefix="bms-identify-") as t:
        tmp = Path(t)
        for name in names:
            if (f := score_profile(name, frames, ids, tmp, cache=cache)) is not None:
                fits.append(f)
            for d in dbcs:
                f = score_profile(name, frames, ids, tmp, [d], cache)
                if f is not None and f.frames:
                    fits.append(f)
    fits.sort(key=lambda f: (-round(f.score, 1), -f.frames, f.profile))
    fits.extend(dbc_coverage(d, ids) for d in dbcs)
    return fits, stats


def guess_chemistry(cell_v_avg: float | None) -> str | None:
    """A resting cell above 3.6 V is not LFP (its plateau is 3.2-3.35 V, full 3.6 V);
    2.9-3.45 V is LFP's range. The fault rules' cell limits follow the chemistry, so the
    default (lfp) on an NMC pack raises over-voltage alarms on healthy cells."""
    if cell_v_avg is None:
        return None
    if cell_v_avg > 3.6:
        return "nmc"
    if 2.9 <= cell_v_avg <= 3.45:
        return "lfp"
    return None


def starter_config(fit: Fit, log: Path) -> str:
    dbc = f", dbc: [{', '.join(fit.own_dbc)}]" if fit.own_dbc else ""
    chem = guess_chemistry(fit.cell_v_avg)
    chem_key = f", chemistry: {chem}" if chem else ""
    chem_note = (f"; chemistry from the cells' {fit.cell_v_avg:.3f} V: check it"
                 if chem and fit.cell_v_avg is not None else "")
    return (f"# starter config from `bms-gateway identify {log.name}` "
            f"(profile {fit.profile}, score {fit.score:.0f}); docs/config.md has every key\n"
            "can: {interface: socketcan, channel: can0, bitrate: 500000}  # your bus and bitrate\n"
            "packs:\n"
            f"  - {{id: pack1, profile: {fit.profile}{dbc}{chem_key}}}"
            f"  # cells seen in the capture: {fit.cells}; set cell_count to your pack's"
            f"{chem_note}\n"
            "mqtt: {url: mqtt://localhost:1883, topic_prefix: bms}\n")


def table(fits: Sequence[Fit], total_frames: int) -> str:
    rows = [f"{'profile':<22} {'score':>5} {'frames':>8} {'ids':>7} {'values':>7} "
            f"{'cells':>5} {'voltage':>8}  notes"]
    for f in fits:
        v = "" if f.voltage_v is None else f"{f.voltage_v:.1f} V"
        label = f.profile + "".join(f" +{Path(d).name}" for d in f.own_dbc)
        rows.append(f"{label:<22} {f.score:5.0f} {f.frames:8d} "
                    f"{f.ids_seen:>3}/{f.ids_used:<3} {f.values:>3}/{f.mapped:<3} "
                    f"{f.cells:5d} {v:>8}  {'; '.join(f.notes)[:120]}")
    rows.append(f"({total_frames} frames read; score 0-100, {FITS_AT:.0f} or more fits)")
    return "\n".join(rows)


def report(fits: Sequence[Fit], stats: SourceStats, log: Path) -> tuple[str, bool]:
    """The human-readable answer, and whether anything fits."""
    out = [table(fits, stats.frames), ""]
    best = fits[0] if fits else None
    if best is None or best.score < FITS_AT:
        near = f" (best: {best.profile}, score {best.score:.0f})" if best is not None else ""
        out.append(f"Nothing fits: no shipped profile explains this capture{near}. Give your "
                   "BMS's DBC with --dbc FILE to see which messages it names, and write a "
                   "profile for it (docs/profiles.md).")
        return "\n".join(out), False
    ties = [f.profile for f in fits[1:] if round(f.score) == round(best.score)]
    also = f" (as good: {', '.join(ties)})" if ties else ""
    out.append(f"Best fit: {best.profile}, score {best.score:.0f}{also}.")
    out.append("")
    out.append(starter_config(best, log))
    return "\n".join(out), True
