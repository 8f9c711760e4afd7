"""Where the built-in profiles, DBCs and example config are, and how names in a config
resolve to files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# gateway/config/paths.py: the project root is three levels up
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
# A checkout (or editable install) has config/ and dbc/ beside the package; a wheel
# installs them under <prefix>/share/bms-gateway (setup.cfg data_files).
_SHARE = Path(sys.prefix) / "share" / "bms-gateway"
_IN_TREE = (PROJECT_ROOT / "config" / "profiles").is_dir()
BUILTIN_PROFILES = PROJECT_ROOT / "config" / "profiles" if _IN_TREE else _SHARE / "profiles"
BUILTIN_DBC = PROJECT_ROOT / "dbc" if _IN_TREE else _SHARE / "dbc"
BUILTIN_CONFIG = PROJECT_ROOT / "config" if _IN_TREE else _SHARE / "config"


def resolve_file(base: Path, name: str, builtin: Path) -> Path:
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        return p
    for cand in (base / p, builtin / p, PROJECT_ROOT / p):
        if cand.exists():
            return cand
    return base / p


def find_profile(name: str, base: Path) -> Path:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return resolve_file(base, name, BUILTIN_PROFILES)
    for d in (base / "profiles", BUILTIN_PROFILES):
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").exists():
                return d / f"{name}{ext}"
    return BUILTIN_PROFILES / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in BUILTIN_PROFILES.glob("*.yaml"))


def default_state_dir() -> Path:
    if sd := os.environ.get("STATE_DIRECTORY"):
        return Path(sd.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "bms-gateway"

