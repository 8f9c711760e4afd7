"""One runtime, one sink protocol (issue 14): every command composes `Runtime` with a
`Sink`, and the runtime never asks which kind of sink it has."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from gateway.commands.watch import WatchSink, WatchStore
from gateway.config import GatewayConfig, load_config
from gateway.publish.sink import Sink, StdoutSink
from gateway.runtime.pipeline import Pipeline
from gateway.runtime.runtime import Runtime
from gateway.source.logs import LogError, Pacer, SourceStats, read_log
from tests.conftest import REPO
from tests.test_chaos_config import write

SAMPLE_LOG = REPO / "config" / "sample.log"


def play(cfg: GatewayConfig, sink: Sink) -> tuple[int, int]:
    """The sample log through a runtime into `sink`; (outbox depth, tasks left running)."""

    async def scenario() -> tuple[int, int]:
        rt = Runtime(cfg, Pipeline(cfg), sink=sink, outbox_path=":memory:")
        async with rt:
            task = rt.start(sink.name, sink.run())
            assert task.get_name() == sink.name
            await rt.play(read_log(SAMPLE_LOG, SourceStats()), Pacer(None))
            assert await rt.deliver(5.0, list)
            depth = rt.outbox.depth()
        return depth, sum(1 for t in rt.tasks if not t.done())

    return asyncio.run(scenario())


def test_stdout_and_the_dashboard_get_the_same_output(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, extra=f"state_dir: {tmp_path / 'state'}"),
                      mqtt_url="-")
    out = io.StringIO()
    stdout = StdoutSink(out)
    assert play(cfg, stdout) == (0, 0)  # every event delivered (acked), no task left
    store = WatchStore(cfg.mqtt.topic_prefix)
    watch = WatchSink(store)
    assert play(cfg, watch) == (0, 0)
    last: dict[str, str] = {}
    for line in out.getvalue().splitlines():
        topic, _, payload = line.partition(" ")
        last[topic] = payload
    assert store.data, "the dashboard saw no pack"
    for pack, slot in store.data.items():
        for leaf in ("state", "cells", "faults"):
            assert json.loads(last[f"bms/{pack}/{leaf}"]) == slot[leaf], leaf
    assert stdout.events_published > 0
    # the dashboard takes the snapshots only; stdout prints the events among them
    assert watch.status().published + stdout.events_published == stdout.status().published


def test_an_error_in_the_body_comes_out_as_itself(tmp_path: Path) -> None:
    """Not wrapped in the TaskGroup's ExceptionGroup: the CLI catches a LogError met in
    the middle of a log as a LogError (one line, exit 1)."""
    cfg = load_config(write(tmp_path, extra=f"state_dir: {tmp_path / 'state'}"),
                      mqtt_url="-")

    async def scenario() -> None:
        rt = Runtime(cfg, Pipeline(cfg), sink=StdoutSink(io.StringIO()),
                     outbox_path=":memory:")
        async with rt:
            rt.start("stdout", rt.sink.run())
            msg = "the log broke off"
            raise LogError(msg)

    with pytest.raises(LogError, match="broke off"):
        asyncio.run(scenario())


def test_building_a_runtime_acquires_nothing(tmp_path: Path) -> None:
    """The outbox is opened and the sink built by `async with`, not by the constructor:
    a caller that fails between the two (replay's missing log) has nothing to close."""
    cfg = load_config(write(tmp_path, extra=f"state_dir: {tmp_path / 'state'}"),
                      mqtt_url="mqtt://127.0.0.1:1")
    path = tmp_path / "outbox.sqlite"
    rt = Runtime(cfg, Pipeline(cfg), outbox_path=path)
    assert not path.exists()
    with pytest.raises(RuntimeError, match="before `async with"):
        rt.sink  # noqa: B018
    rt.close()  # nothing opened: nothing to do

    async def scenario() -> tuple[bool, str]:
        async with rt:
            opened = path.exists()
            return opened, type(rt.sink).__name__

    assert asyncio.run(scenario()) == (True, "MqttSink")


def test_a_bad_outbox_is_refused_on_entering(tmp_path: Path) -> None:
    """A directory as the outbox: the constructor accepts it, `async with` raises the
    OutboxError (exit 3) as itself, and no task was started."""
    from gateway.publish.outbox import OutboxError

    cfg = load_config(write(tmp_path, extra=f"state_dir: {tmp_path / 'state'}"),
                      mqtt_url="-")
    rt = Runtime(cfg, Pipeline(cfg), sink=StdoutSink(io.StringIO()), outbox_path=tmp_path)

    async def scenario() -> None:
        async with rt:
            raise AssertionError("entered with a directory as the outbox")

    with pytest.raises(OutboxError):
        asyncio.run(scenario())
    assert rt.tasks == []
