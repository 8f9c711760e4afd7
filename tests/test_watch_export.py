"""watch (rendered to text at 80x24), decode (against a real broker's view of the same
replay) and plot, on logs generated here with cantools for the example-bms profile and
on config/sample.log."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import cantools
import pytest
import yaml

from gateway.cli import main
from gateway.commands.export import Summary, parse_ts, records
from gateway.commands.watch import (
    MAX_MARK,
    MIN_MARK,
    PackView,
    ViewModel,
    WatchStore,
    fmt_age,
    parse_mqtt_url,
    render_text,
)
from gateway.config import GatewayConfig, load_config
from gateway.runtime.pipeline import Pipeline
from gateway.source.logs import SourceStats, read_log

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "config" / "sample.log"
T0 = 1_763_800_000.0


def make_log(path: Path, *, cells: int = 16, seconds: float = 120.0, seed: int = 7) -> Path:
    """A candump -l log of the example BMS: charging, then discharging; one high and one
    low cell, a cell running over 3.65 V for a while, a BMS over-temperature flag."""
    db = cantools.database.load_file(str(REPO / "dbc" / "example-bms.dbc"))
    assert isinstance(db, cantools.database.can.Database)
    msg = {n: db.get_message_by_name(n) for n in (
        "PackStatus", "PackLimits", "TemperatureSummary", "AlarmFlags", "CellVoltages",
        "CellTemperatures", "CellBalancing")}
    rnd = random.Random(seed)
    offs = [rnd.gauss(0, 0.004) for _ in range(cells)]
    high, low = cells // 3, cells // 2
    offs[high], offs[low] = 0.035, -0.028
    n_temps = max(6, cells // 4)
    lines: list[tuple[float, str]] = []

    def emit(t: float, name: str, data: dict[str, float]) -> None:
        m = msg[name]
        lines.append((t, f"({t:.6f}) can0 {m.frame_id:03X}#{m.encode(data).hex().upper()}"))

    steps = int(seconds * 10)
    for k in range(steps):
        t = T0 + k * 0.1
        x = k / steps
        current = 40.0 if x < 0.6 else -60.0
        soc = 40 + 50 * x if x < 0.6 else 70 - 30 * (x - 0.6)
        base = 3.20 + soc / 100 * 0.2
        cell_v = [base + o + (0.3 if i == high and 0.45 < x < 0.55 else 0.0)
                  for i, o in enumerate(offs)]
        temp = 22 + 10 * x
        emit(t, "PackStatus", {"PackVoltage": min(655.0, round(sum(cell_v), 2)),
                               "PackCurrent": current, "StateOfCharge": round(soc * 2) / 2,
                               "StateOfHealth": 97, "State": 2 if current > 0 else 3,
                               "AliveCounter": k % 256})
        flags = dict.fromkeys(("CellOverVoltage", "CellUnderVoltage", "UnderTemperature",
                               "OverCurrentCharge", "OverCurrentDischarge", "InsulationFault",
                               "InternalFault"), 0)
        emit(t, "AlarmFlags", {**flags, "OverTemperature": int(0.3 < x < 0.5)})
        if k % 5 == 0:
            emit(t + 0.01, "PackLimits", {
                "ChargeCurrentLimit": 50, "DischargeCurrentLimit": 100,
                "ChargeVoltageLimit": min(655.0, round(3.55 * cells, 2)),
                "DischargeVoltageLimit": round(2.9 * cells, 2)})
        if k % 10 == 0:
            emit(t + 0.02, "TemperatureSummary", {
                "MinTemperature": round(temp - 1), "MaxTemperature": round(temp + 2),
                "AvgTemperature": round(temp), "MinTemperatureSensor": 1,
                "MaxTemperatureSensor": 2, "SensorCount": n_temps})
            for g in range(math.ceil(n_temps / 6)):
                emit(t + 0.03, "CellTemperatures", {"TemperatureGroup": g, **{
                    f"Temperature{g * 6 + s:02d}": round(temp + s % 3) for s in range(6)}})
            for g in range(math.ceil(cells / 32)):
                emit(t + 0.04, "CellBalancing", {"BalancingGroup": g, **{
                    f"Balancing{g * 32 + s:03d}": int(g * 32 + s == high and x < 0.6)
                    for s in range(32)}})
        if k % 2 == 0:
            for g in range(math.ceil(cells / 4)):
                emit(t + 0.05 + g * 0.0005, "CellVoltages", {"CellGroup": g, **{
                    f"CellVoltage{g * 4 + s:03d}": round(cell_v[g * 4 + s] * 1000
                                                         + rnd.gauss(0, 1))
                    if g * 4 + s < cells else 0 for s in range(4)}})
    lines.sort(key=lambda item: item[0])
    path.write_text("".join(f"{line}\n" for _, line in lines))
    return path


def write_config(tmp: Path, *, mqtt_url: str | None = None) -> Path:
    """The example config (as the sample log was made with), state and broker redirected."""
    raw = yaml.safe_load((REPO / "config" / "gateway.example.yaml").read_text())
    raw["state_dir"] = str(tmp / "state")
    raw.setdefault("mqtt", {})["url"] = mqtt_url
    raw["homeassistant"] = {"discovery": False}
    p = tmp / "gateway.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("logs")
    return {"16": make_log(d / "c16.log"), "192": make_log(d / "c192.log", cells=192,
                                                           seconds=40)}


@pytest.fixture
def cfg(tmp_path: Path) -> GatewayConfig:
    return load_config(write_config(tmp_path))


def live_view(cfg: GatewayConfig, log: Path, until_s: float) -> tuple[PackView, float]:
    """Run the pipeline on `log` up to `until_s` of frame time; the pack as watch sees it."""
    pl = Pipeline(cfg)
    frames = [f for batch in read_log(log, SourceStats()) for f in batch]
    pl.feed_log([f for f in frames if f[0] <= frames[0][0] + until_s])
    rt = pl.packs[0]
    st = rt.live.state
    st.derive()
    return PackView.from_pack_state(st, faults=rt.faults.active(), online=st.online), pl.clock


def assert_fits(text: str, width: int = 80, height: int = 24) -> list[str]:
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height, f"{len(lines)} lines:\n{text}"
    assert max(len(ln) for ln in lines) <= width, text
    return lines


# ------------------------------------------------------------------ watch


def test_watch_16_cells_at_80x24(cfg: GatewayConfig, logs: dict[str, Path]) -> None:
    pv, now = live_view(cfg, logs["16"], 58)
    text = render_text(ViewModel((pv,), now, "test"), 80, 24)
    lines = assert_fits(text)
    assert lines[-1].startswith("╰") and lines[-1].endswith("╯")  # the panel is whole
    v = pv.values
    assert f"{v['soc_pct']:5.1f} %" in text
    assert f"{v['voltage_v']:.2f} V" in text
    assert "charging" in text and "online" in text
    lo = min(c for c in pv.cell_v if c is not None)
    hi = max(c for c in pv.cell_v if c is not None)
    assert f"{MIN_MARK}{lo:.3f} #{pv.cell_v.index(lo) + 1}" in text
    assert f"{MAX_MARK}{hi:.3f} #{pv.cell_v.index(hi) + 1}" in text
    # compact grid: every cell with its voltage, the extremes marked in the grid too
    for i, c in enumerate(pv.cell_v):
        assert c is not None
        assert f"{i + 1:>2}" in text and f"{c:.3f}" in text
    assert f"{hi:.3f}█{MAX_MARK}" in text and f"{lo:.3f}▁{MIN_MARK}" in text
    assert "*bal #6" in text  # cell 6 (the high one) is balancing while charging
    # active faults: the BMS flag and the gateway's own rule on cell 6, with their age
    codes = {f.code for f in pv.faults}
    assert {"bms_over_temperature", "cell_over_voltage"} <= codes, codes
    for f in pv.faults:
        assert f.code in text
        assert f.since is not None
        assert fmt_age(now - f.since) in text
    assert "ALRM" in text


def test_watch_192_cells_at_80x24(cfg: GatewayConfig, logs: dict[str, Path]) -> None:
    pv, now = live_view(cfg, logs["192"], 10)
    assert len(pv.cell_v) == 192
    text = render_text(ViewModel((pv,), now, "test"), 80, 24)
    lines = assert_fits(text)
    assert lines[-1].startswith("╰") and lines[-1].endswith("╯")
    assert "Cells 192" in text
    lo = min(c for c in pv.cell_v if c is not None)
    hi = max(c for c in pv.cell_v if c is not None)
    assert f"{MIN_MARK}{lo:.3f} #{pv.cell_v.index(lo) + 1}" in text
    assert f"{MAX_MARK}{hi:.3f} #{pv.cell_v.index(hi) + 1}" in text
    # dense mode: one glyph per cell in rows of 64 labelled 1, 65, 129; the extremes
    # are drawn as their marks (once in the stats line, once in the grid, once in the legend)
    grid = [ln for ln in lines if ln[2:6].strip().isdigit()]
    assert [ln[2:5].strip() for ln in grid] == ["1", "65", "129"]
    glyphs = sum(sum(ch in "▁▂▃▄▅▆▇█▲▼·" for ch in ln) for ln in grid)
    assert glyphs == 192
    assert text.count(MAX_MARK) == 3 and text.count(MIN_MARK) == 3
    # a wide terminal has room for the compact grid
    wide = render_text(ViewModel((pv,), now, "test"), 160, 48)
    assert_fits(wide, 160, 48)
    assert f"{hi:.3f}█{MAX_MARK}" in wide and "192 " in wide


def test_watch_many_faults_and_packs_still_fit(cfg: GatewayConfig,
                                               logs: dict[str, Path]) -> None:
    pv, now = live_view(cfg, logs["192"], 10)
    faults = [{"code": f"rule_{i}", "severity": "warning", "source": "gateway",
               "since": "2025-11-22T08:26:45.000Z", "value": 1, "limit": 0,
               "message": f"fault number {i}"} for i in range(12)]
    busy = PackView.from_payloads("busy", {"soc_pct": 50.0, "voltage_v": 600.0},
                                  {"voltages_v": list(pv.cell_v)}, faults, "online")
    text = render_text(ViewModel((busy,), now, "test"), 80, 24)
    assert_fits(text)
    assert "more faults" in text
    small, _ = live_view(cfg, logs["16"], 58)
    many = (pv, small, busy, PackView("empty"), small)
    for w, h in ((80, 24), (80, 12), (60, 8)):
        assert_fits(render_text(ViewModel(many, now, "test"), w, h), w, h)
    text = render_text(ViewModel((*many, small), now, "test"), 80, 6)
    assert_fits(text, 80, 6)
    assert "… 2 more packs" in text and "waiting for data" in text


def test_watch_store_and_url() -> None:
    store = WatchStore("bms")
    assert store.apply("bms/house/availability", b"online")
    assert store.apply("bms/house/state", json.dumps(
        {"ts": "2026-01-01T00:00:00.000Z", "pack_id": "house", "soc_pct": 61.5}).encode())
    assert not store.apply("bms/gateway/gw1/status", b"{}")
    assert not store.apply("other/house/state", b"{}")
    assert not store.apply("bms/house/state", b"{not json")
    vm = store.view(parse_ts("2026-01-01T00:00:05.000Z") or 0.0, "t")
    text = render_text(vm)
    assert "house" in text and "61.5 %" in text and "5s ago" in text
    assert parse_mqtt_url("mqtts://u:p%40ss@broker.lan") == ("broker.lan", 8883, True, "u",
                                                             "p@ss")
    assert parse_mqtt_url("mqtt://127.0.0.1:1884")[:3] == ("127.0.0.1", 1884, False)


@pytest.mark.parametrize("url", ["mqtt://[::1", "mqtt://host:port", "mqtt://h:99999"])
def test_watch_with_an_unparsable_url_is_one_line_not_a_traceback(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # urlsplit itself refuses "[::1" and "host:port" (ValueError): that too is a bad
    # --mqtt, exit 1 with the usual line
    assert main(["watch", "--mqtt", url]) == 1
    err = capsys.readouterr().err
    assert f"error: bad MQTT url {url!r}" in err
    assert "Traceback" not in err


def test_watch_log_reports_a_profile_problem_before_a_missing_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # as replay does (and watch did before the Runtime): the config's pipeline is built
    # first, so a misspelt signal is a config error (exit 3), whatever the log
    prof = (REPO / "config" / "profiles" / "example-bms.yaml").read_text()
    prof = prof.replace("signal: PackVoltage}", "signal: PackVoltge}").replace(
        "dbc: [example-bms.dbc]", f"dbc: [{REPO / 'dbc' / 'example-bms.dbc'}]")
    (tmp_path / "bad.yaml").write_text(prof)
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("gateway_id: t\ncan: {interface: virtual, channel: x}\n"
                   f"packs:\n  - {{id: p, profile: {tmp_path / 'bad.yaml'}}}\n")
    assert main(["watch", "-c", str(cfg), "--log", str(tmp_path / "missing.log")]) == 3
    err = capsys.readouterr().err
    assert "no signal 'PackVoltge'" in err and "log file not found" not in err


# ------------------------------------------------------------------ decode


def _log_for(which: str, logs: dict[str, Path]) -> Path:
    if which == "sample":
        if not SAMPLE.exists():
            pytest.skip("config/sample.log is not there yet")
        return SAMPLE
    return logs[which]


@pytest.mark.parametrize("which", ["16", "sample"])
async def test_decode_matches_what_mqtt_subscribers_see(
        which: str, logs: dict[str, Path], tmp_path: Path, broker: Any,
        subscriber_factory: Any) -> None:
    from gateway.runtime.replay import replay

    log = _log_for(which, logs)
    cfg_path = write_config(tmp_path, mqtt_url=broker.url)
    cfg = load_config(cfg_path)
    sub = subscriber_factory(broker.port, ["bms/#"])
    await replay(cfg, log, speed=None)
    # the offline availability is the replay's last retained publication
    assert sub.wait_for(lambda ms: any(t == "bms/house/availability" and p == b"offline"
                                       for t, p, _ in ms))
    out = tmp_path / "out.jsonl"
    assert await asyncio.to_thread(main, ["decode", str(log), "-c", str(cfg_path), "--out",
                                          str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by_kind: dict[str, list[Any]] = {}
    for r in recs:
        assert set(r) == {"topic", "kind", "payload"}
        by_kind.setdefault(r["kind"], []).append(r)

    def mqtt(leaf: str) -> list[Any]:
        return [p.decode() if leaf == "availability" else json.loads(p)
                for p in sub.topic(f"bms/house/{leaf}")]

    states = [r["payload"] for r in by_kind["state"]]
    got = mqtt("state")
    assert got and got[-1] == states[-1]  # the retained state a subscriber is left with
    it = iter(states)  # the broker may coalesce snapshots, never invent or reorder them
    assert all(any(s == g for s in it) for g in got)
    assert mqtt("cells")[-1] == by_kind["cells"][-1]["payload"]
    assert mqtt("faults")[-1] == by_kind["faults"][-1]["payload"]
    assert mqtt("availability")[-1] == by_kind["availability"][-1]["payload"] == "offline"

    def strip(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if k != "event_id"}  # has a random part

    events = [strip(r["payload"]) for r in by_kind["event"]]
    assert events, "the log should raise faults"
    assert [strip(e) for e in mqtt("events")] == events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_decode_csv_and_events_file(cfg: GatewayConfig, logs: dict[str, Path],
                                    tmp_path: Path) -> None:
    summary = Summary()
    recs = list(records(cfg, logs["16"], summary=summary))
    out = tmp_path / "run.csv"
    assert main(["decode", str(logs["16"]), "-c", str(cfg.path), "--format", "csv", "--out",
                 str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    states = [r.payload for r in recs if r.kind == "state"]
    assert len(rows) == len(states) == summary.counts["state"]
    assert rows[-1]["ts"] == states[-1]["ts"]
    assert float(rows[-1]["voltage_v"]) == states[-1]["voltage_v"]
    assert rows[-1]["balancing_active"] in ("true", "false")  # rows[0]: cells not yet known
    events = list(csv.DictReader((tmp_path / "run.events.csv").read_text().splitlines()))
    want = [r.payload for r in recs if r.kind == "event"]
    assert [(e["code"], e["state"], e["seq"]) for e in events] == [
        (w["code"], w["state"], str(w["seq"])) for w in want]
    assert any(e["cell"] == "6" for e in events)  # the gateway's cell_over_voltage on cell 6


def test_decode_resampled(cfg: GatewayConfig, logs: dict[str, Path]) -> None:
    recs = list(records(cfg, logs["16"], every=10.0))
    ts = [t for r in recs if r.kind == "state" and (t := parse_ts(r.payload["ts"]))]
    assert len(ts) >= 10
    # every 10 s of frame time; the last sample is at the end of the log
    steps = {round(b - a, 3) for a, b in itertools.pairwise(ts[:-1])}
    assert steps == {10.0}
    assert any(r.kind == "event" for r in recs)
    with pytest.raises(ValueError, match="positive"):
        list(records(cfg, logs["16"], every=0))


def test_decode_errors(cfg: GatewayConfig, tmp_path: Path, capfd: Any) -> None:
    assert main(["decode", str(tmp_path / "missing.log"), "-c", str(cfg.path)]) == 1
    assert "not found" in capfd.readouterr().err


# ------------------------------------------------------------------ plot


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_an_image(suffix: str, cfg: GatewayConfig, logs: dict[str, Path],
                              tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plot needs the optional matplotlib extra")
    out = tmp_path / f"plot{suffix}"
    assert main(["plot", str(logs["16"]), "-c", str(cfg.path), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert len(data) > 10_000
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert b"<svg" in data[:2000]
        assert b"cell_over_voltage" in data  # the fault markers are labelled


def test_plot_rejects_unknown_suffix(cfg: GatewayConfig, logs: dict[str, Path],
                                     tmp_path: Path) -> None:
    assert main(["plot", str(logs["16"]), "-c", str(cfg.path), "--out",
                 str(tmp_path / "x.gif")]) == 2
