"""Command line: `bms-gateway run|replay|check-config|...`; one small function per command."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, GatewayConfig, load_config

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3  # start-up failure: systemd's RestartPreventExitStatus=3 stops the loop

log = logging.getLogger("gateway")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.example.yaml"


def _setup_logging(level: str, stream: object = None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,  # type: ignore[arg-type]
        force=True,
    )


def _load(args: argparse.Namespace, mqtt: str | None = None) -> GatewayConfig | None:
    try:
        return load_config(args.config, mqtt_url=mqtt)
    except ConfigError as e:
        print(f"config error{'s' if len(e.problems) > 1 else ''}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    try:
        pipeline = Pipeline(cfg)
    except ConfigError as e:
        print(f"config error{'s' if len(e.problems) > 1 else ''}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{cfg.path}: OK")
    for rt in pipeline.packs:
        pc = rt.compiled.cfg
        print(f"  pack {pc.id}: profile {pc.profile.name} on bus {pc.bus}, "
              f"{len(rt.compiled.handlers)} messages, DBC {', '.join(str(d) for d in pc.profile.dbc)}"
              f"{', transmit ON' if pc.transmit else ''}")
    print(f"  mqtt: {cfg.mqtt.url or 'stdout'}; state_dir: {cfg.state_dir}")
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


def cmd_replay(args: argparse.Namespace) -> int:
    from .daemon import replay
    from .source import LogError

    cfg = _load(args, args.mqtt)
    if cfg is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or cfg.log_level)
    try:
        rt = asyncio.run(replay(cfg, args.log, speed=args.speed))
    except ConfigError as e:
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    st = rt.log_stats
    c = rt.pipeline.counters
    if st is not None:
        log.info("replayed %d frames (%d decoded, %d unknown id, %d malformed lines, %d too short)",
                 st.frames, sum(x.decoded for x in c), sum(x.unknown for x in c), st.bad_lines,
                 rt.pipeline.short_frames())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .outbox import OutboxError

    cfg = _load(args, args.mqtt)
    if cfg is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or cfg.log_level)

    async def main() -> int:
        try:
            d = Daemon(cfg)
        except ConfigError as e:
            for p in e.problems:
                log.error("%s", p)
            return EXIT_CONFIG
        except OutboxError as e:
            log.error("%s", e)
            return EXIT_CONFIG
        return await d.serve()

    return asyncio.run(main())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bms-gateway", description=__doc__)
    ap.add_argument("--version", action="version", version=f"bms-gateway {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"gateway config (default: {DEFAULT_CONFIG.name})")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("run", help="run the daemon on live CAN buses")
    common(p)
    p.add_argument("--mqtt", help="broker URL overriding mqtt.url; '-' prints to stdout")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="feed a recorded log through the same pipeline")
    p.add_argument("log", type=Path, help="candump -l, .asc, .blf, .trc, .csv, .mf4, SLCAN .raw")
    common(p)
    p.add_argument("--speed", type=_speed, default=None,
                   help="'max' (default) or a factor of real time (1 = as recorded)")
    p.add_argument("--mqtt", help="broker URL overriding mqtt.url; '-' prints to stdout")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("check-config", help="validate config, profiles and DBCs together")
    common(p)
    p.set_defaults(func=cmd_check_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a watchdog SIGABRT leaves the stuck stack in the journal
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", None) or "info")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
