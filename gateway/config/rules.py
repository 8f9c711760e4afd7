"""A config's `rules:` (global, refined per pack) -> one `RuleSpec` per rule.

What each rule is (kind, field, defaults, bounds) is the fault stage's knowledge, in
gateway/faults/rules.py; this module only reads and checks what the YAML says."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
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
                chemistry: str = "lfp", *, refine: Any = None,
                refine_key: str = "") -> dict[str, RuleSpec]:
    """Defaults for every rule merged with the YAML overrides under `key`, then with
    `refine` (a pack's own `rules:`, under `refine_key`), which refines them key by key.

    Problems are appended (never raised), each under the key the user wrote: a setting
    from `overrides` under `key`, one the pack set (or a rule it replaced) under
    `refine_key`. A rule with a bad value keeps that value's default so the rest of the
    config can still be checked.
    """
    r = Reader(file, problems)
    for block, at in ((overrides, key), (refine, refine_key)):
        if block is not None and not isinstance(block, dict):
            r.bad(at or "rules", "must be a mapping of rule name to settings",
                  "e.g. rules: {low_soc: {raise_at: 20}}")
    raw_all: dict[Any, Any] = dict(overrides) if isinstance(overrides, dict) else {}
    # rule name -> the settings the pack wrote (None: the whole rule is the pack's)
    own: dict[Any, frozenset[Any] | None] = {}
    for name, ov in (refine if isinstance(refine, dict) else {}).items():
        base = raw_all.get(name)
        if isinstance(base, dict) and isinstance(ov, dict):
            raw_all[name], own[name] = {**base, **ov}, frozenset(ov)
        else:
            raw_all[name], own[name] = ov, None

    def where(name: Any, *settings: str) -> str:
        """The rule's key in the block that wrote it, or any of `settings` of it."""
        block = key
        if name in own:
            mine = own[name]
            block = refine_key if mine is None or not mine.isdisjoint(settings) else key
        return f"{block}.{name}" if block else str(name)

    for name in raw_all:
        if name not in RULES:
            r.bad(where(name), "unknown rule",
                  nearest(str(name), list(RULES)) or f"rules are: {', '.join(RULES)}")
    out = default_rules(chemistry)
    for name, d in RULES.items():
        if name in raw_all:
            out[name] = _parse_one(r, functools.partial(where, name), name, d,
                                   raw_all[name], out[name])
    return out


def _parse_one(r: Reader, at: Callable[..., str], name: str, d: RuleDef, raw: Any,
               dflt: RuleSpec) -> RuleSpec:
    """`at(*settings)`: the rule's key where those settings were written."""
    if raw is None:
        return dflt
    if isinstance(raw, bool):
        return dataclasses.replace(dflt, enabled=raw)
    if not isinstance(raw, dict):
        r.bad(at(), f"must be a mapping or true/false, got {raw!r}",
              f"e.g. {name}: {{enabled: false}}")
        return dflt
    allowed = RULE_KEYS[d.kind]
    # an event rule given a threshold gets its own message, not "unknown key"
    thresholds = RULE_KEYS["rate"] - allowed if d.kind == "event" else frozenset()
    for k in raw:
        if k in thresholds:
            r.bad(f"{at(k)}.{k}", f"{name} has no thresholds",
                  f"allowed keys: {', '.join(sorted(allowed))}")
        elif k not in allowed:
            r.bad(f"{at(k)}.{k}", "unknown key",
                  nearest(str(k), allowed) or f"allowed keys: {', '.join(sorted(allowed))}")
    enabled = r.bool_(raw, at("enabled"), "enabled", dflt.enabled)
    severity: Any = raw.get("severity", dflt.severity)
    if severity not in SEVERITIES:
        r.bad(f"{at('severity')}.severity", f"unknown severity {severity!r}",
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
            r.bad(f"{at(k)}.{k}", f"must be a number{' or null' if nullable else ''}, got {v!r}",
                  f"e.g. {k}: {fmt_num(default) if default is not None else 1}")
            return default
        if not lo <= v <= hi:
            # debounce_s and window_s are seconds, whatever the rule judges
            unit = "s" if k.endswith("_s") else d.unit or "the rule unit"
            r.bad(f"{at(k)}.{k}", f"{v} is out of range {fmt_num(lo)}..{fmt_num(hi)}",
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
            r.bad(f"{at('raise_at', 'clear_at')}.clear_at", "has no effect while raise_at is null",
                  f"set {name}.raise_at too, or remove clear_at")
        clear_at = None
    elif clear_at is None:
        clear_at = raise_at
    elif (clear_at > raise_at) if upper else (clear_at < raise_at):
        side, other = ("above", "below") if upper else ("below", "above")
        g = _gap(d, raise_at) or 1.0
        example = raise_at - g if upper else raise_at + g
        r.bad(f"{at('raise_at', 'clear_at')}.clear_at",
              f"{fmt_num(clear_at)} is {side} raise_at {fmt_num(raise_at)}, but {name} is "
              f"{'an upper' if upper else 'a lower'} limit: it must clear {other} where it "
              "raises", f"set clear_at {other} {fmt_num(raise_at)}, e.g. clear_at: {fmt_num(example)}")
        raise_at, clear_at = dflt.raise_at, dflt.clear_at
    return RuleSpec(name, enabled, severity, raise_at, clear_at, debounce, window)
