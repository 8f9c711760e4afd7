"""The gateway's exceptions: one base, so that the command line catches them in one place.

Every error the gateway raises on purpose derives from :class:`GatewayError`; its
``exit_code`` is the documented exit status of a command that ends with it (README.md:
1 runtime error, 2 usage error, 3 configuration error). The classes live beside the
code that raises them; the tree::

    Exception
     +-- GatewayError                    exit 1 unless the subclass says otherwise
          +-- ConfigError                (gateway.config.problems) exit 3
          |                              config, profile or scenario problems, all at
          |                              once: a misspelt signal name, a state_dir that
          |                              is a file, a bus interface whose extra is missing
          +-- DbcError                   (gateway.decode.dbc) exit 3
          |                              a DBC that cannot be read or parsed: a missing
          |                              file, a VAL_ line naming no signal
          +-- ExprError                  (gateway.normalize.expr) exit 3
          |                              a profile expression outside the whitelist
          |                              (`__import__`, a name that is no signal); always
          |                              reported as a config problem of its profile key
          +-- OutboxError                (gateway.publish.outbox) exit 3
          |                              the event outbox cannot be used: --outbox /proc/
          |                              version, a corrupt outbox.sqlite, a full disk
          |                              while creating it
          +-- BrokerAddressError         (gateway.publish.mqtt; also a ValueError)   exit 3
          |                              mqtt.url names a host no resolver takes (a label
          |                              over 63 characters): found only at connect
          +-- FormatError                (gateway.source.logformats; also a ValueError)
          |                              exit 2: --log-format with an unknown field or a
          |                              regular expression without the group `id`, a
          |                              --start that is no date
          +-- LogError                   (gateway.source.logs) exit 1
          |                              a log that cannot be read: missing, a directory,
          |                              a format python-can cannot open
          +-- MissingExtra               (gateway.errors) exit 1
          |                              an optional extra the command needs is not
          |                              installed: `plot` without matplotlib, `watch`
          |                              without rich, `--loop uvloop` without uvloop
          +-- WatchError                 (gateway.commands.watch) exit 1
          |                              the dashboard cannot start: rich not installed,
          |                              --mqtt with a URL that is not mqtt[s]://
          +-- RegistryError              (gateway.publish.homeassistant; also a ValueError)
                                         a Home Assistant registry message on the broker
                                         that is not ours to adopt: counted, never fatal

Errors are wrapped with ``raise ... from`` so the cause stays in a debug traceback;
``str(error)`` is the one clear line a user sees.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "GatewayError",
           "MissingExtra", "require_extra"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3  # start-up failure: systemd's RestartPreventExitStatus=3 stops the loop


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose (see the tree above)."""

    exit_code: int = EXIT_RUNTIME


class MissingExtra(GatewayError):
    """An optional extra a command needs is not installed (see the tree above)."""


def require_extra(module: str, what: str, extra: str, requirement: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = (f"{what} needs {module}, an optional extra: pip install 'bms-gateway[{extra}]' "
               f"(or pip install '{requirement}')")
        raise MissingExtra(msg) from None
