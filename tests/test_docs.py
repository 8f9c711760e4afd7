"""The docs say what the program does (issue 13).

Every `bms-gateway` command in README.md and docs/deploy.md (code blocks and inline code)
is a real subcommand whose options exist, and every key docs/config.md documents is
known to the config loader; the keys with a sample value below load with it.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser, main
from gateway.config import ConfigError, load_config
from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "docs" / "deploy.md"]


def _command(segment: str) -> str | None:
    """The arguments after `bms-gateway` when the segment runs it, else None."""
    words = segment.split()
    while words and (words[0] in ("sudo", "time", "exec") or "=" in words[0]):
        words = words[3:] if words[:2] == ["sudo", "-u"] else words[1:]
    if words and (words[0] == "bms-gateway" or words[0].endswith("/bin/bms-gateway")):
        return " ".join(words[1:])
    if words[:3] in (["python", "-m", "gateway"], ["python3", "-m", "gateway"]):
        return " ".join(words[3:])
    return None


def _commands(doc: Path) -> list[str]:
    """`bms-gateway ...` command lines in fenced blocks and in `inline code`."""
    text = doc.read_text()
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for span in spans:
        # in a table an escaped pipe separates alternatives of one command: check them all
        for line in span.replace("\\\n", " ").replace("\\|", " ").splitlines():
            for segment in re.split(r"&&|\|\||;|\||\$\(", line.split(" #")[0]):
                cmd = _command(segment)
                if cmd:  # "" is the program's path in a table, not a command
                    out.append(" ".join(cmd.replace("[", " ").replace("]", " ").split()))
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def _documented() -> list[tuple[str, str]]:
    return [(doc.name, cmd) for doc in DOCS for cmd in _commands(doc)]


def test_the_docs_show_commands() -> None:
    subs = {cmd.split()[0] for _, cmd in _documented()}
    assert {"replay", "run", "check-config", "watch", "decode", "plot", "simulate"} <= subs


@pytest.mark.parametrize(("doc", "cmd"), _documented())
def test_documented_command_exists(doc: str, cmd: str, capsys: pytest.CaptureFixture[str],
                                   ) -> None:
    words = cmd.split()
    subs = _subparsers()
    if words[0].startswith("-"):  # `bms-gateway --help`, `--version`
        assert words[0] in ("--help", "-h", "--version"), f"{doc}: {cmd}"
        return
    sub = words[0]
    assert sub in subs, f"{doc}: `bms-gateway {cmd}`: no subcommand {sub!r}"
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: bms-gateway {sub}")
    known = subs[sub]._option_string_actions
    for w in words[1:]:
        if w.startswith("-") and w != "-":
            assert w.split("=")[0] in known, f"{doc}: `bms-gateway {cmd}`: no option {w}"


# ------------------------------------------------------------------ docs/config.md

# A valid value for each documented key; `{tmp}` is a folder with the files named here.
SAMPLES: dict[str, dict[str, Any]] = {
    "top": {
        "gateway_id": "docs-gw", "state_dir": "{tmp}/state", "log_level": "debug",
        "can": {"interface": "virtual", "channel": "docs"},
        "packs": [{"id": "house", "profile": "example-bms"}], "mqtt": {"url": "-"},
        "publish": {"state": {"min_interval_s": 2}}, "rules": {},
        "homeassistant": {"discovery": True, "prefix": "homeassistant"},
        "outbox": {"max_events": 1000, "max_age_s": 86400}, "shutdown_timeout_s": 5,
        "prometheus": "127.0.0.1:9108",
    },
    "can": {
        "interface": "virtual", "channel": "docs", "name": "bus0", "bitrate": 250000,
        "fd": True, "data_bitrate": 2000000, "options": {"receive_own_messages": False},
        "receive": "python-can", "kernel_filter": False,
    },
    "packs": {
        "id": "house", "profile": "example-bms", "dbc": "{repo}/dbc/example-bms.dbc",
        "bus": "docs", "id_offset": 0, "transmit": False, "stale_after_s": 7,
        "cell_count": 16, "chemistry": "nmc", "rules": {}, "publish": {"deadband": {}},
        "dbc_lenient": True,
    },
    "mqtt": {
        "url": "mqtts://broker.example:8883", "topic_prefix": "site/bms",
        "client_id": "docs-client", "username": "gw", "password_file": "{tmp}/pw",
        "password_env": "DOCS_PW", "password": "inline", "protocol": "3.1.1", "keepalive": 20,
        "tls": {"ca_file": "{tmp}/ca.pem", "insecure": False}, "max_payload": 100000,
    },
    "publish": {
        "state": {"min_interval_s": 2, "max_interval_s": 30},
        "cells": {"min_interval_s": 10, "max_interval_s": 120},
        "deadband": {"voltage_v": 0.1, "soc_pct": 1}, "cell_deadband_v": 0.005,
        "per_value_topics": True,
    },
}
SECTIONS = {"Top level": "top", "`can`: buses": "can", "`packs`": "packs", "`mqtt`": "mqtt",
            "`publish`: the publishing policy": "publish"}


def _documented_keys() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "config.md").read_text()
    out = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        if title not in SECTIONS:
            continue
        for row in re.findall(r"^\| (`[^|]+`) \|", part, flags=re.M):
            for key in re.findall(r"`([^`]+)`", row):
                out.append((SECTIONS[title], key.split(".")[0]))
    return out


def test_config_md_documents_keys() -> None:
    keys = _documented_keys()
    assert {s for s, _ in keys} == set(SECTIONS.values())
    assert len(keys) > 40


@pytest.mark.parametrize(("section", "key"), sorted(set(_documented_keys())))
def test_documented_config_key_is_accepted(section: str, key: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "ca.pem").write_text("")
    monkeypatch.setenv("DOCS_PW", "secret")
    cfg: dict[str, Any] = {"can": {"interface": "virtual", "channel": "docs"},
                           "packs": [{"id": "house", "profile": "example-bms"}]}
    # without a sample here, at least the key must be known (its value may be refused)
    value = SAMPLES[section].get(key, "no-sample")
    if section == "top":
        cfg[key] = value
    elif section == "packs":
        cfg["packs"][0][key] = value
    elif section == "can":
        cfg["can"][key] = value
        if key in ("fd", "data_bitrate"):
            cfg["can"].update(fd=True, data_bitrate=2000000)
    else:
        cfg[section] = {key: value}
    text = yaml.safe_dump(cfg).replace("{tmp}", str(tmp_path)).replace("{repo}", str(REPO))
    path = tmp_path / "gw.yaml"
    path.write_text(textwrap.dedent(text))
    try:
        loaded = load_config(path)
    except ConfigError as e:
        unknown = [str(p) for p in e.problems if "unknown key" in p.what]
        assert not unknown, f"docs/config.md documents {section} key {key!r}: {unknown}"
        assert key not in SAMPLES[section], f"the sample value of {key!r} is refused: {e}"
        return
    assert loaded.path == path


def test_readme_sample_output_is_what_the_quick_start_prints(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The quick start's sample lines, `...` standing for what is left out, are found in
    order in a real line of the same topic (the README showed `current_a 40.1`, the
    replay printed 40)."""
    text = (REPO / "README.md").read_text()
    block = text.split("one `topic payload` line each:\n\n```\n", 1)[1].split("```", 1)[0]
    shown = [ln.split(" ", 1) for ln in block.splitlines() if " " in ln]
    assert len(shown) >= 3
    assert main(["replay", str(REPO / "config" / "sample.log"), "-c",
                 str(REPO / "config" / "gateway.example.yaml"), "--mqtt", "-",
                 "--speed", "max"]) == 0
    real = [ln.split(" ", 1) for ln in capsys.readouterr().out.splitlines() if " " in ln]
    for topic, sample in shown:
        pieces = sample.split("...")

        def fits(payload: str, pieces: list[str] = pieces) -> bool:
            if not payload.startswith(pieces[0]):
                return False
            at = len(pieces[0])
            for piece in pieces[1:]:
                at = payload.find(piece, at)
                if at < 0:
                    return False
                at += len(piece)
            return True
        assert any(t == topic and fits(p) for t, p in real), f"{topic} {sample}"
