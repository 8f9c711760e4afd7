"""Values the daemon cannot run with, and the checks that refuse them where they are
written (ids, topic segments, host names, file sizes, CAN interfaces)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from gateway.config.problems import nearest

TOPIC_SEGMENT_MAX = 64

_SEGMENT_BAD = re.compile(r"[/+#\x00]")


def topic_segment_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if _SEGMENT_BAD.search(value):
        return "must not contain '/', '+', '#' or NUL (it is used as an MQTT topic segment)"
    if len(value) > TOPIC_SEGMENT_MAX:
        return f"is longer than {TOPIC_SEGMENT_MAX} characters"
    return None


# ------------------------------------------- values the daemon cannot run with (issue 10)
# check-config is the contract: what it accepts must start and run, so these are the
# values that got through it and then failed (a traceback, 8 GB, a read of /dev/zero).

MAX_CELLS = 1024  # cells per pack: 16 s x 64 p is the largest seen; bounds allocation
YAML_MAX_BYTES = 4 * 1024 * 1024
DBC_MAX_BYTES = 64 * 1024 * 1024


def file_problem(path: Path, max_bytes: int) -> str | None:
    """A config, profile or DBC path must be a regular file of a sane size."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing files get their own message where they are used
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_size > max_bytes:
        return f"{path} is {st.st_size} bytes, more than the {max_bytes} allowed"
    return None


_ID_OK = re.compile(r"[A-Za-z0-9_-]+")
ID_FIX = "use letters, digits, '-' and '_' (not '_' first), e.g. house-1"


def id_problem(value: str) -> str | None:
    """A gateway or pack id: an MQTT topic segment, a client id, a file name and part of
    Home Assistant's node ids, which HA takes only as `[a-zA-Z0-9_-]+`; anything else
    passed here once and then silently announced nothing. A leading '_' is refused so
    that `homeassistant.node_body` stays unambiguous (it ends the gateway id with '_')."""
    if (prob := topic_segment_problem(value)) is not None:
        return prob
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text (a lone surrogate escape)"
    if not _ID_OK.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _ID_OK.fullmatch(c)}))
        return (f"contains {bad!r}: ids are MQTT topic segments and Home Assistant node ids, "
                "which take only letters, digits, '-' and '_'")
    if value.startswith("_"):
        return "starts with '_' (Home Assistant node ids would be ambiguous)"
    return None


def state_dir_problem(path: Path) -> str | None:
    """A state directory the daemon could not create its outbox in, where that is certain
    (whether the service user may write it is not known here: check-config may run as
    another user)."""
    if path.exists():
        return None if path.is_dir() else f"{path} exists and is not a directory"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{path} cannot be created: {parent} is not a directory"
            return None
    return None


HOST_MAX = 253
LABEL_MAX = 63


def host_problem(host: str) -> str | None:
    """A broker host name the resolver can take (labels <= 63, total <= 253, IDNA):
    otherwise every connect fails with UnicodeError, which retrying cannot fix."""
    if ":" in host:  # an IPv6 literal (the URL had it in brackets)
        return None
    if not host:
        return "has no host name"
    if len(host) > HOST_MAX:
        return f"host name is {len(host)} characters long, more than {HOST_MAX}"
    for label in host.rstrip(".").split("."):
        if not label:
            return f"host name {host!r} has an empty label (two dots in a row)"
        if len(label) > LABEL_MAX:
            return f"host name label {label[:20]}... is {len(label)} characters, more than {LABEL_MAX}"
    try:
        host.encode("idna")
    except UnicodeError as e:
        return f"host name {host!r} is not a valid international name ({e})"
    return None


def can_interface_problem(name: str) -> tuple[str, str] | None:
    """python-can's interface names; an unknown one otherwise retries for ever at run time."""
    from can.interfaces import VALID_INTERFACES

    if name in VALID_INTERFACES:
        return None
    return (f"unknown CAN interface {name!r}",
            nearest(name, VALID_INTERFACES)
            or f"one of {', '.join(sorted(VALID_INTERFACES))} (python-can's names)")

