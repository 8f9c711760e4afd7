"""Command line: `bms-gateway run|replay|check-config|...`; one small function per command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.config import BUILTIN_CONFIG, ConfigError, GatewayConfig, load_config
from gateway.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    GatewayError,
    require_extra,
)

if TYPE_CHECKING:
    from gateway.config import Scenario
    from gateway.runtime.pipeline import Pipeline
    from gateway.source.logformats import LineFormat

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "build_parser", "main"]

log = logging.getLogger("gateway")
DEFAULT_CONFIG = BUILTIN_CONFIG / "gateway.example.yaml"


def _setup_logging(level: str, stream: object = None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,  # type: ignore[arg-type]
        force=True,
    )


def _report(e: GatewayError) -> None:
    """The one place where an error that ends a command is printed: one line, or a
    config error's problems under a heading, one per line."""
    if isinstance(e, ConfigError):
        print(f"{e.kind} error{'s' if len(e.problems) > 1 else ''}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)


def _load(args: argparse.Namespace, mqtt: str | None = None) -> GatewayConfig:
    return load_config(args.config, mqtt_url=mqtt)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.runtime.pipeline import Pipeline
    from gateway.source.logs import interface_problems

    cfg = _load(args)
    pipeline = Pipeline(cfg)
    if problems := interface_problems(cfg):
        raise ConfigError(problems)
    if cfg.prometheus is not None:  # `run` refuses to start without prometheus-client
        from gateway.runtime.metrics import require

        require(cfg.path)
    if args.show_code is not None:
        return _show_code(pipeline, args.show_code)
    print(f"{cfg.path}: OK")
    for pack in pipeline.packs:
        pc = pack.live.cfg
        print(f"  pack {pc.id}: profile {pc.profile.name} on bus {pc.bus}, "
              f"{len(pack.live.handlers)} messages, DBC {', '.join(str(d) for d in pc.profile.dbc)}"
              f"{', transmit ON' if pc.transmit else ''}")
    print(f"  mqtt: {cfg.mqtt.url or 'stdout'}; state_dir: {cfg.state_dir}")
    return EXIT_OK


def _show_code(pipeline: Pipeline, pack: str) -> int:
    """Print the generated handler source of one pack (each line names its profile key)."""
    packs = {p.live.cfg.id: p.live for p in pipeline.packs}
    compiled = packs.get(pack)
    if compiled is None:
        print(f"error: no pack {pack!r} in the config; packs: {', '.join(packs)}",
              file=sys.stderr)
        return EXIT_USAGE
    for key in sorted(compiled.code):
        print(compiled.code[key])
    return EXIT_OK


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        v = float(text)
    except ValueError:
        msg = f"--speed must be 'max' or a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if v <= 0:
        msg = "--speed must be positive"
        raise argparse.ArgumentTypeError(msg)
    return v


def _log_options(args: argparse.Namespace, cfg: GatewayConfig | None = None
                 ) -> tuple[LineFormat | None, float | None]:
    """--log-format / --ts-unit / --ts-base (else the config's `log_format`) and --start
    (a FormatError, exit 2, when they cannot work)."""
    from gateway.source.logformats import LineFormat, parse_start

    if args.log_format:
        fmt: LineFormat | None = LineFormat.parse(args.log_format, args.ts_unit, args.ts_base)
    elif cfg is not None and cfg.log_format is not None:
        fmt = LineFormat.parse(*cfg.log_format)
    else:
        fmt = None
    start = parse_start(args.start) if args.start is not None else None
    return fmt, start


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.publish.outbox import OutboxError
    from gateway.runtime.replay import replay
    from gateway.runtime.runtime import run_loop

    cfg = _load(args, args.mqtt)
    line_format, start = _log_options(args, cfg)
    _setup_logging(args.log_level or cfg.log_level)
    try:
        rt = run_loop(replay(cfg, args.log, speed=args.speed, outbox_path=args.outbox,
                             line_format=line_format, start=start), args.loop)
    except OutboxError as e:  # --outbox names a directory, a device, /proc/...
        if args.outbox is None:
            raise
        msg = f"--outbox: {e}"
        raise OutboxError(msg) from e
    except KeyboardInterrupt:  # only where replay could not install its handlers
        print("replay interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    st = rt.log_stats
    c = rt.pipeline.counters
    if rt.interrupted:
        # one line, whatever the log level: how far it got (the outbox is closed)
        print(rt.interruption, file=sys.stderr)
    elif st is not None:
        log.info("replayed %d frames (%d decoded, %d unknown id, %d malformed lines, %d too short)",
                 st.frames, sum(x.decoded for x in c), sum(x.unknown for x in c), st.bad_lines,
                 rt.pipeline.short_frames())
    if rt.sink_error:
        return EXIT_RUNTIME  # logged where it happened
    if rt.undelivered:
        where = (f"they stay in {args.outbox}: replay with the same --outbox to deliver them"
                 if args.outbox else "give --outbox FILE to keep them for another try")
        log.error("%d events were not delivered to the broker; %s", rt.undelivered, where)
    if rt.interrupted:
        return 128 + rt.interrupted  # as if the signal had ended it: 130, 143, 129
    return EXIT_RUNTIME if rt.undelivered else EXIT_OK


def _stopped_early() -> bool:
    """A SIGTERM/SIGINT that came while starting (gateway.entry caught it): stop cleanly."""
    from gateway import entry

    sig = entry.received()
    if sig is not None:
        log.info("%s while starting: stopping", signal.Signals(sig).name)
    return sig is not None


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.runtime.daemon import Daemon
    from gateway.runtime.runtime import run_loop
    from gateway.source.logs import interface_problems

    cfg = _load(args, args.mqtt)
    if problems := interface_problems(cfg):
        raise ConfigError(problems)
    _setup_logging(args.log_level or cfg.log_level)
    if _stopped_early():
        return EXIT_OK

    async def main() -> int:
        d = Daemon(cfg)
        if _stopped_early():
            return EXIT_OK
        return await d.serve()

    return run_loop(main(), args.loop)


def _sim_setup(args: argparse.Namespace, mqtt: str | None = None) -> tuple[
        GatewayConfig, Scenario | None]:
    """Config and scenario for simulate/demo."""
    from gateway.config import load_scenario

    cfg = _load(args, mqtt)
    _setup_logging(args.log_level or cfg.log_level)
    try:
        scenario = load_scenario(args.scenario) if args.scenario else None
    except ConfigError as e:
        raise ConfigError(e.problems, kind="scenario") from e
    return cfg, scenario


def cmd_simulate(args: argparse.Namespace) -> int:
    import can

    from gateway.commands.simulate import (
        FIXED_START,
        Simulator,
        find_pack,
        log_channel,
        write_candump,
    )
    from gateway.source.logs import open_bus

    cfg, scenario = _sim_setup(args)
    pack = find_pack(cfg, args.pack)
    sim = Simulator(pack, scenario=scenario, seed=args.seed)
    if args.out is not None:
        start = FIXED_START if args.start is None else args.start
        n = write_candump(sim.frames(start, args.duration or 60.0, args.period), args.out,
                          log_channel(cfg, pack))
        log.info("wrote %d frames (%.0f s of pack %s) to %s", n, args.duration or 60.0, pack.id,
                 args.out)
        return EXIT_OK
    if args.interface is not None:
        bus_cfg = next(b for b in cfg.buses if b.name == pack.bus)
        bus_cfg = type(bus_cfg)(bus_cfg.name, args.interface, args.channel or "0", None)
    else:
        bus_cfg = next(b for b in cfg.buses if b.name == pack.bus)
    if bus_cfg.interface == "virtual":
        log.warning("the virtual bus only reaches this process: use `bms-gateway demo` to run "
                    "the gateway with the simulator, or --out to write a log")
    try:
        bus = open_bus(bus_cfg)
    except (can.CanError, OSError, ValueError, ImportError) as e:
        log.error("cannot open %s:%s: %s", bus_cfg.interface, bus_cfg.channel, e)
        return EXIT_RUNTIME
    log.info("simulating pack %s (%s, %d cells) on %s:%s", pack.id, pack.profile.name, sim.cells,
             bus_cfg.interface, bus_cfg.channel)
    try:
        n = asyncio.run(sim.run_on_bus(bus, args.speed, args.duration, period=args.period,
                                       t0=args.start))
        log.info("sent %d frames", n)
    except KeyboardInterrupt:
        return 130
    finally:
        bus.shutdown()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.commands.simulate import run_demo

    cfg, scenario = _sim_setup(args, args.mqtt)
    return asyncio.run(run_demo(cfg, scenario=scenario, duration=args.duration,
                                seed=args.seed, pack_id=args.pack))


def cmd_watch(args: argparse.Namespace) -> int:
    from gateway.commands.watch import require_rich, watch_bus, watch_log, watch_mqtt

    require_rich()
    # log lines would tear the full-screen display: only errors, unless asked for
    _setup_logging(args.log_level or "error")
    limits = {"ok_mv": args.ok_mv, "warn_mv": args.warn_mv}
    try:
        if args.mqtt is not None:
            asyncio.run(watch_mqtt(args.mqtt, args.prefix or "bms", ca_file=args.ca_file,
                                   **limits))
            return EXIT_OK
        cfg = _load(args)
        if args.log is not None:
            asyncio.run(watch_log(cfg, args.log, speed=args.speed, **limits))
        else:
            asyncio.run(watch_bus(cfg, **limits))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how one leaves the dashboard
    return EXIT_OK


def cmd_decode(args: argparse.Namespace) -> int:
    from gateway.commands.export import (
        Progress,
        Summary,
        events_path,
        records,
        write_csv,
        write_jsonl,
    )

    cfg = _load(args)
    line_format, start = _log_options(args, cfg)
    _setup_logging(args.log_level or "warning")
    if not args.log_level:  # fault events are the output here, not news for stderr
        logging.getLogger("gateway.pipeline").setLevel(logging.ERROR)
    if args.format == "jsonl" and args.events is not None:
        print("error: --events is for --format csv (jsonl has the events inline)",
              file=sys.stderr)
        return EXIT_USAGE
    summary = Summary()
    files = []
    try:
        out = sys.stdout
        if args.out is not None:
            out = args.out.open("w", encoding="utf-8", newline="")
            files.append(out)
        with Progress(args.log) as progress:
            recs = records(cfg, args.log, every=args.every_frame_time, summary=summary,
                           progress=progress, line_format=line_format, start=start)
            if args.format == "jsonl":
                write_jsonl(recs, out)
            else:
                ev_path = args.events or (events_path(args.out) if args.out else None)
                ev = None
                if ev_path is not None:
                    ev = ev_path.open("w", encoding="utf-8", newline="")
                    files.append(ev)
                lost = write_csv(recs, out, ev)
                if lost:
                    log.warning("%d fault events not written: give --events FILE (or --out) "
                                "for the events CSV", lost)
    except (ValueError, OSError) as e:  # a LogError goes on to main: "error: ...", exit 1
        if isinstance(e, BrokenPipeError):  # `| head`: the reader has what it wanted
            return EXIT_OK
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        for f in files:
            f.close()
    c, st = summary.counts, summary.stats
    log.info("%d frames (%d malformed lines): %d state, %d cells, %d availability, %d faults, "
             "%d event records", st.frames, st.bad_lines, c["state"], c["cells"],
             c["availability"], c["faults"], c["event"])
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from gateway.commands.export import Progress, collect, plot, records

    if args.out.suffix.lower() not in (".png", ".svg", ".pdf"):
        print(f"error: --out {args.out}: use a .png, .svg or .pdf file", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args)
    _setup_logging(args.log_level or "warning")
    if not args.log_level:
        logging.getLogger("gateway.pipeline").setLevel(logging.ERROR)
    require_extra("matplotlib", "plot", "plot", "matplotlib>=3.7")
    try:
        with Progress(args.log) as progress:
            series = collect(records(cfg, args.log, progress=progress), args.pack)
        plot(series, args.out, title=f"{args.log.name}: pack {series.pack_id}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    log.info("wrote %s", args.out)
    return EXIT_OK


def cmd_identify(args: argparse.Namespace) -> int:
    import json

    from gateway.commands.identify import identify, report

    # every profile meets foreign frames here: their warnings are noise, the table says it
    line_format, _ = _log_options(args)
    quiet = logging.getLogger("gateway")
    level = quiet.level
    if not args.log_level:
        quiet.setLevel(logging.ERROR)
    try:
        fits, stats = identify(args.log, args.dbc, line_format=line_format)
    finally:
        quiet.setLevel(level)
    text, fits_any = report(fits, stats, args.log)
    if args.json:
        print(json.dumps([f.as_dict() for f in fits], indent=1))
    else:
        print(text)
    return EXIT_OK if fits_any else EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bms-gateway", description=__doc__)
    ap.add_argument("--version", action="version", version=f"bms-gateway {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"gateway config (default: {DEFAULT_CONFIG.name})")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    def log_opts(p: argparse.ArgumentParser, alias: bool = True) -> None:
        names = ["--log-format", "--format"] if alias else ["--log-format"]
        p.add_argument(*names, dest="log_format", metavar="SPEC",
                       help="a text logger's line format: a preset (hex-ms) or a regular "
                            "expression with named groups ts, id, data (docs/config.md)")
        p.add_argument("--ts-unit", choices=["s", "ms", "us", "ns"],
                       help="with --log-format: the timestamp's unit (default s)")
        p.add_argument("--ts-base", type=int, choices=[10, 16],
                       help="with --log-format: 16 for hex timestamps (default 10)")
        p.add_argument("--start", metavar="TIME",
                       help="anchor a log with relative timestamps: epoch seconds or ISO "
                            "date and time (UTC unless it has an offset)")

    def loop_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                       help="event loop: uvloop when installed (auto), or force one")

    p = sub.add_parser("run", help="run the daemon on live CAN buses")
    common(p)
    p.add_argument("--mqtt", help="broker URL overriding mqtt.url; '-' prints to stdout")
    loop_opt(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="feed a recorded log through the same pipeline")
    p.add_argument("log", type=Path, help="candump -l, .asc, .blf, .trc, .csv, .mf4, SLCAN .raw, GVRET .csv")
    common(p)
    p.add_argument("--speed", type=_speed, default=None,
                   help="'max' (default) or a factor of real time (1 = as recorded)")
    p.add_argument("--mqtt", help="broker URL overriding mqtt.url; '-' prints to stdout")
    p.add_argument("--outbox", type=Path,
                   help="outbox file for this replay's events (default: in memory; never "
                   "the live daemon's)")
    loop_opt(p)
    log_opts(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("check-config", help="validate config, profiles and DBCs together")
    common(p)
    p.add_argument("--show-code", metavar="PACK",
                   help="print the Python generated for the pack's frame handlers")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("simulate", help="a virtual BMS sending the frames of a pack's profile")
    common(p)
    p.add_argument("--pack", help="pack id from the config (default: the first)")
    p.add_argument("--interface", help="python-can interface (default: the pack's bus)")
    p.add_argument("--channel", help="channel for --interface")
    p.add_argument("--scenario", type=Path, help="timed injections (docs/simulate.md)")
    p.add_argument("--duration", type=float, help="seconds (default: forever; 60 with --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--speed", type=float, default=1.0, help="factor of real time (default 1)")
    p.add_argument("--period", type=float, default=0.1, help="simulation step in s (0.1)")
    p.add_argument("--start", type=float,
                   help="epoch of the first frame (default: now; with --out 2026-01-01)")
    p.add_argument("--out", type=Path, help="write a candump -l log instead of sending")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulator and gateway in one process on a virtual bus")
    common(p)
    p.add_argument("--pack", help="simulate only this pack (default: all)")
    p.add_argument("--scenario", type=Path, help="timed injections (docs/simulate.md)")
    p.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mqtt", help="broker URL overriding mqtt.url; '-' prints to stdout")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("watch", help="live terminal dashboard (from MQTT, a log or the buses)")
    common(p)
    p.add_argument("--mqtt", metavar="URL",
                   help="watch any gateway on this broker: mqtt[s]://[user:pass@]host[:port]")
    p.add_argument("--prefix", help="topic prefix with --mqtt (default: bms)")
    p.add_argument("--ca-file", help="CA bundle for mqtts:// with --mqtt")
    p.add_argument("--log", type=Path, help="replay this log through the pipeline (no broker)")
    p.add_argument("--speed", type=_speed, default=1.0,
                   help="with --log: factor of real time (default 1) or 'max'")
    p.add_argument("--ok-mv", type=float, default=5.0,
                   help="cells within this many mV of the mean are green (default 5)")
    p.add_argument("--warn-mv", type=float, default=20.0,
                   help="yellow up to this many mV from the mean, red beyond (default 20)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("decode", help="a log as the time series and fault events MQTT would get")
    p.add_argument("log", type=Path, help="candump -l, .asc, .blf, .trc, .csv, .mf4, SLCAN .raw, GVRET .csv")
    common(p)
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                   help="jsonl (default): every record; csv: one row per state")
    p.add_argument("--out", type=Path, help="output file (default: stdout)")
    p.add_argument("--events", type=Path,
                   help="csv: the fault events file (default: <stem>.events.csv beside "
                        "--out, e.g. run.csv -> run.events.csv)")
    p.add_argument("--every-frame-time", type=float, metavar="S",
                   help="resample state and cells every S seconds of frame time")
    log_opts(p, alias=False)  # --format is the output format here
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("identify", help="which profile fits a capture: every shipped profile "
                       "ranked, and a starter config for the best")
    p.add_argument("log", type=Path, help="candump -l, .asc, .blf, .trc, .csv, .mf4, SLCAN .raw, GVRET .csv")
    p.add_argument("--dbc", type=Path, action="append", default=[], metavar="FILE",
                   help="also try every profile on this DBC (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="a JSON list of candidates, best first (profile, score, ...)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    log_opts(p)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("plot", help="plot a log: pack values, cell heatmap, fault markers")
    p.add_argument("log", type=Path, help="candump -l, .asc, .blf, .trc, .csv, .mf4, SLCAN .raw, GVRET .csv")
    common(p)
    p.add_argument("--out", type=Path, required=True, help="image file: .png, .svg or .pdf")
    p.add_argument("--pack", help="pack id (default: the first that published)")
    p.set_defaults(func=cmd_plot)
    return ap


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(Exception):  # stderr without a file descriptor (embedding)
        faulthandler.enable()  # a watchdog SIGABRT leaves the stuck stack in the journal
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", None) or "info")
    try:
        return int(args.func(args))
    except GatewayError as e:
        _report(e)
        return e.exit_code
    except BrokenPipeError:
        # `bms-gateway replay ... | head`: the reader left; that is not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
