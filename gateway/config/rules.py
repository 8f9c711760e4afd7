"""A config's `rules:` (global, refined per pack) -> one `RuleSpec` per rule.

What each rule is (kind, field, defaults, bounds) is the fault stage's knowledge, in
gateway/faults/rules.py; this module only reads and checks what the YAML says."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gateway.config.problems import Problem, Reader, nearest
from gateway.faults.rules import RULE_KEYS, RULES, RuleDef, RuleSpec, default_rules, fmt_num
from gateway.model import SEVERITIES


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _gap(d: RuleDef, raise_at: float) -> float:
    default_raise, default_clear, _ = d.limits
    if default_raise is not None and default_clear is not None:
        return abs(default_raise - default_clear)
    return abs(raise_at) * d.rel_gap


def parse_rules(overrides: Any, file: str, key: str, problems: list[Problem],
                chemistry: str = "lfp") -> dict[str, RuleSpec]:
    """Defaults for every rule merged with the YAML overrides under `key`.

    Problems are appended (never raised); a rule with a bad value keeps that value's
    default so the rest of the config can still be checked.
    """
    r = Reader(file, problems)
    if overrides is not None and not isinstance(overrides, dict):
        r.bad(key or "rules", "must be a mapping of rule name to settings",
              "e.g. rules: {low_soc: {raise_at: 20}}")
    raw_all: dict[Any, Any] = overrides if isinstance(overrides, dict) else {}
    for name in raw_all:
        if name not in RULES:
            r.bad(f"{key}.{name}" if key else str(name), "unknown rule",
                  nearest(str(name), list(RULES)) or f"rules are: {', '.join(RULES)}")
    out = default_rules(chemistry)
    for name, d in RULES.items():
        if name in raw_all:
            out[name] = _parse_one(r, f"{key}.{name}" if key else name, name, d,
                                   raw_all[name], out[name])
    return out


def _parse_one(r: Reader, key: str, name: str, d: RuleDef, raw: Any,
               dflt: RuleSpec) -> RuleSpec:
    if raw is None:
        return dflt
    if isinstance(raw, bool):
        return dataclasses.replace(dflt, enabled=raw)
    if not isinstance(raw, dict):
        r.bad(key, f"must be a mapping or true/false, got {raw!r}",
              f"e.g. {name}: {{enabled: false}}")
        return dflt
    allowed = RULE_KEYS[d.kind]
    # an event rule given a threshold gets its own message, not "unknown key"
    thresholds = RULE_KEYS["rate"] - allowed if d.kind == "event" else frozenset()
    for k in raw:
        if k in thresholds:
            r.bad(f"{key}.{k}", f"{name} has no thresholds",
                  f"allowed keys: {', '.join(sorted(allowed))}")
    r.known({k: v for k, v in raw.items() if k not in thresholds}, key, allowed)
    enabled = r.bool_(raw, key, "enabled", dflt.enabled)
    severity: Any = raw.get("severity", dflt.severity)
    if severity not in SEVERITIES:
        r.bad(f"{key}.severity", f"unknown severity {severity!r}",
              nearest(str(severity), list(SEVERITIES)) or f"one of {', '.join(SEVERITIES)}")
        severity = dflt.severity

    def num(k: str, default: float | None, lo: float, hi: float,
            nullable: bool) -> float | None:
        if k not in raw:
            return default
        v = raw[k]
        if v is None and nullable:
            return None
        if not _number(v):
            r.bad(f"{key}.{k}", f"must be a number{' or null' if nullable else ''}, got {v!r}",
                  f"e.g. {k}: {fmt_num(default) if default is not None else 1}")
            return default
        if not lo <= v <= hi:
            # debounce_s and window_s are seconds, whatever the rule judges
            unit = "s" if k.endswith("_s") else d.unit or "the rule unit"
            r.bad(f"{key}.{k}", f"{v} is out of range {fmt_num(lo)}..{fmt_num(hi)}",
                  f"use a value in {unit} within that range")
            return default
        return float(v)

    if d.kind == "event":
        return RuleSpec(name, enabled, severity)
    debounce = num("debounce_s", dflt.debounce_s, 0.0, 3600.0, False) or 0.0
    window = num("window_s", dflt.window_s, 0.1, 3600.0, False) if d.kind == "rate" else None
    lo, hi = d.bounds
    raise_at = num("raise_at", dflt.raise_at, lo, hi, d.kind != "rate")
    clear_at = num("clear_at", dflt.clear_at, lo, hi, True)
    upper = d.kind != "low"
    if raw.get("clear_at") is None and "raise_at" in raw and raise_at is not None \
            and raise_at != dflt.raise_at:
        # Only raise_at was moved: keep the default hysteresis width.
        g = _gap(d, raise_at)
        clear_at = max(lo, raise_at - g) if upper else min(hi, raise_at + g)
    if raise_at is None:
        if raw.get("clear_at") is not None:
            r.bad(f"{key}.clear_at", "has no effect while raise_at is null",
                  f"set {name}.raise_at too, or remove clear_at")
        clear_at = None
    elif clear_at is None:
        clear_at = raise_at
    elif (clear_at > raise_at) if upper else (clear_at < raise_at):
        side, other = ("above", "below") if upper else ("below", "above")
        g = _gap(d, raise_at) or 1.0
        example = raise_at - g if upper else raise_at + g
        r.bad(f"{key}.clear_at",
              f"{fmt_num(clear_at)} is {side} raise_at {fmt_num(raise_at)}, but {name} is "
              f"{'an upper' if upper else 'a lower'} limit: it must clear {other} where it "
              "raises", f"set clear_at {other} {fmt_num(raise_at)}, e.g. clear_at: {fmt_num(example)}")
        raise_at, clear_at = dflt.raise_at, dflt.clear_at
    return RuleSpec(name, enabled, severity, raise_at, clear_at, debounce, window)
