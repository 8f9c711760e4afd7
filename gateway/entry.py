"""Process entry point: stop signals are caught before anything slow is imported.

Importing the CLI (asyncio, yaml, the config schema) takes about 0.2 s, loading a config
and opening the outbox longer: a SIGTERM in that window used to end `run` by the default
action (exit 143, as if it had crashed). For `run`, SIGTERM and SIGINT are recorded from
the first moment; the daemon honours a recorded one as soon as it can (exit 0, outbox
closed). For `replay`, SIGTERM, SIGINT and SIGHUP: it stops before the first frame (exit
128 + the signal, gateway/runtime/replay.py). Other commands keep Python's defaults.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def catch(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    for sig in signals:
        signal.signal(sig, _record)


def received() -> int | None:
    """The first stop signal caught before the event loop took over, if any."""
    return _received[0] if _received else None


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        catch()
    elif sys.argv[1:2] == ["replay"]:  # SIGHUP, too, stops a replay
        catch((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    from gateway.cli import main as cli_main

    return cli_main()


__all__ = ["catch", "main", "received"]
