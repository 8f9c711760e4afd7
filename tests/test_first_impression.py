"""The first minute after start (issue 13): the cell count is announced once, when known.

The bundled sample sends its 16 cells in four multiplexed groups of four and 32
balancing flags. Before, the first `cells` had 4 voltages, then 8, 12, 16, Home Assistant
got its cell entities in four steps, and `balancing` had 32 entries. Everything here runs
the real replay into a real mosquitto and records every message, retained or not.
"""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.runtime.replay import replay
from tests.conftest import REPO, Broker

SAMPLE = REPO / "config" / "sample.log"


def _config(tmp: Path, url: str, pack: str) -> Path:
    cfg = tmp / "gw.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        gateway_id: first
        state_dir: {tmp / 'state'}
        can: {{interface: virtual, channel: first-{tmp.name}}}
        packs: [{pack}]
        mqtt: {{url: '{url}', topic_prefix: bms}}
        homeassistant: {{discovery: true, prefix: homeassistant}}
        """))
    return cfg


def _everything(tmp: Path, broker: Broker, subscriber_factory: Any,
                pack: str) -> list[tuple[str, bytes, bool]]:
    sub = subscriber_factory(broker.port, ["homeassistant/#", "bms/#"])
    asyncio.run(replay(load_config(_config(tmp, broker.url, pack)), SAMPLE, speed=None))
    last = -1
    deadline = time.monotonic() + 20
    while last != len(sub.messages) and time.monotonic() < deadline:  # until a quiet 0.3 s
        last = len(sub.messages)
        time.sleep(0.3)
    return list(sub.messages)


def _check(messages: list[tuple[str, bytes, bool]], cells: int) -> None:
    cell_cfg = re.compile(r"^homeassistant/sensor/bms_first_house/cell_(\d+)/config$")
    announced = [int(m.group(1)) for t, p, _ in messages if p and (m := cell_cfg.match(t))]
    assert set(announced) == set(range(1, cells + 1))
    # (configs are sent again on connecting; each time the whole set, never a part)
    assert len(announced) % cells == 0
    assert all(announced.count(i) == announced.count(1) for i in range(1, cells + 1))
    registries = {p for t, p, _ in messages if t == "bms/gateway/first/discovery" and p}
    with_cells = [json.loads(r) for r in registries if re.search(rb"sensor/cell_\d", r)]
    assert len(with_cells) == 1, "one set of cell entities, not grown in steps"
    listed = [k for keys in with_cells[0]["nodes"].values() for k in keys
              if re.fullmatch(r"sensor/cell_\d+", k)]
    assert len(listed) == cells

    snaps = [json.loads(p) for t, p, _ in messages if t == "bms/house/cells"]
    assert snaps, "cells were published"
    for s in snaps:
        assert len(s["voltages_v"]) == cells
        assert len(s["balancing"]) == cells  # the frames carry 32 flags
    counts = [json.loads(p)["cell_count"] for t, p, _ in messages if t == "bms/house/state"]
    assert set(counts) <= {None, cells}, "never a partial count"
    assert counts[-1] == cells
    assert counts.index(cells) < 3, "known within the first cycle (about a second)"


def test_sample_announces_the_learned_cell_count_once(tmp_path: Path, broker: Broker,
                                                       subscriber_factory: Any) -> None:
    msgs = _everything(tmp_path, broker, subscriber_factory, "{id: house, profile: example-bms}")
    _check(msgs, 16)
    # until the count is known the state says nothing about cells rather than 4
    first = json.loads(next(p for t, p, _ in msgs if t == "bms/house/state"))
    assert first["cell_count"] is None and first["cell_v_min"] is None


def test_configured_cell_count_is_used_from_the_first_frame(
        tmp_path: Path, broker: Broker, subscriber_factory: Any) -> None:
    msgs = _everything(tmp_path, broker, subscriber_factory,
                       "{id: house, profile: example-bms, cell_count: 16}")
    _check(msgs, 16)
    first = json.loads(next(p for t, p, _ in msgs if t == "bms/house/state"))
    assert first["cell_count"] == 16


def test_a_tap_survives_the_learner_leaving(tmp_path: Path) -> None:
    """A tap (Pipeline.tap, as the poller's) runs before the pack's handler: when the
    cell-count learner is dropped, the tap stays, and untapped entries lose the learner."""
    from gateway.runtime.pipeline import Pipeline
    from gateway.source.logs import SourceStats, read_log

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("can: {interface: virtual, channel: x}\n"
                   "packs: [{id: house, profile: example-bms}]\n")
    p = Pipeline(load_config(cfg))
    assert p.learners
    voltages, temps = 0x408, 0x409
    seen: list[float] = []
    p.tap(0, voltages, lambda ts, data: seen.append(ts))
    before = p.routes(0)[temps]
    for batch in read_log(SAMPLE, SourceStats()):
        p.feed_log(batch)
    p.finish()
    assert not p.learners and p.packs[0].live.state.cells_known
    assert len(seen) > 100
    entry = p.routes(0)[voltages]
    assert entry is not p.packs[0].live.handlers[voltages]  # the tap is still in it
    entry(p.clock + 1, bytes(8))
    assert seen[-1] == p.clock + 1
    assert p.routes(0)[temps] is not before  # the learner is gone from this one
    assert p.routes(0)[temps] is p.packs[0].live.handlers[temps]
