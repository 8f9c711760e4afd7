"""Problems (file, key, what, fix), the error that carries them, and the reader that
collects them while it takes a YAML mapping apart."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from gateway.errors import EXIT_CONFIG, GatewayError


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    key: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        end = "" if self.what.endswith((".", "?", "!")) else "."
        return f"{self.file}: {self.key}: {self.what}{end}{fix}"


class ConfigError(GatewayError):
    """Every problem found in a config, profile or scenario file, each naming the file,
    the key and the fix. `kind` heads the list as the CLI prints it ("config errors:")."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[Problem], *, kind: str = "config") -> None:
        self.problems = problems
        self.kind = kind
        super().__init__("\n".join(str(p) for p in problems))


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Reader:
    """Typed access to a YAML mapping that records problems instead of raising."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems

    def bad(self, key: str, what: str, fix: str = "") -> None:
        self.problems.append(Problem(self.file, key, what, fix))

    def mapping(self, obj: Any, key: str) -> dict[str, Any]:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self.bad(key, f"must be a mapping, got {type(obj).__name__}",
                     "write it as `key: value` lines indented under it")
            return {}
        return obj

    def known(self, obj: dict[str, Any], key: str, allowed: AbstractSet[str]) -> None:
        for k in obj:
            if k not in allowed:
                hint = nearest(str(k), allowed)
                self.bad(f"{key}.{k}" if key else str(k), "unknown key",
                         hint or f"allowed keys: {', '.join(sorted(allowed))}")

    def num(self, obj: dict[str, Any], key: str, name: str, default: float | None,
            lo: float | None = None, hi: float | None = None) -> float | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(f"{key}.{name}" if key else name, f"must be a number, got {v!r}",
                     "write a plain number without quotes, such as 10 or 0.5")
            return default
        if not math.isfinite(v):  # .nan passes every range test; .inf overflows timers
            self.bad(f"{key}.{name}" if key else name, f"must be a finite number, got {v!r}",
                     "write a plain number such as 10 or 0.5")
            return default
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            self.bad(f"{key}.{name}" if key else name, f"{v} is out of range {rng}",
                     f"use a value from {rng.replace('..', ' to ')}")
            return default
        return float(v)

    def int_(self, obj: dict[str, Any], key: str, name: str, default: int | None,
             lo: int | None = None, hi: int | None = None) -> int | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(f"{key}.{name}" if key else name, f"must be a whole number, got {v!r}",
                     "write an integer without quotes, such as 16")
            return default
        if lo is not None and v < lo:
            self.bad(f"{key}.{name}" if key else name, f"must be at least {lo}",
                     f"use a value from {lo} to {hi}" if hi is not None else f"use {lo} or more")
            return default
        if hi is not None and v > hi:
            self.bad(f"{key}.{name}" if key else name, f"{v} is more than the maximum {hi}",
                     f"use a value from {lo if lo is not None else 0} to {hi}")
            return default
        return v

    def str_(self, obj: dict[str, Any], key: str, name: str, default: str | None) -> str | None:
        v = obj.get(name, default)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            self.bad(f"{key}.{name}" if key else name, f"must be text, got {v!r}",
                     "write it as a plain value in quotes, e.g. \"can0\"")
            return default
        return str(v)

    def bool_(self, obj: dict[str, Any], key: str, name: str, default: bool) -> bool:
        v = obj.get(name, default)
        if not isinstance(v, bool):
            self.bad(f"{key}.{name}" if key else name, f"must be true or false, got {v!r}",
                     "write true or false without quotes")
            return default
        return v

    def range_(self, obj: dict[str, Any], key: str, name: str) -> tuple[float, float] | None:
        v = obj.get(name)
        if v is None:
            return None
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                or any(math.isnan(x) for x in v) or v[0] > v[1]):
            self.bad(f"{key}.{name}", f"must be [min, max], got {v!r}", "e.g. valid: [2.0, 4.5]")
            return None
        return float(v[0]), float(v[1])

