"""One error base (issue 14): every error the gateway raises on purpose is a GatewayError,
drawn in gateway/errors.py's tree, and the CLI ends a command with it in one place: one
clear message and the documented exit status, never a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway import cli, errors
from gateway.errors import GatewayError
from tests.conftest import REPO
from tests.test_chaos_config import write

SAMPLE_LOG = REPO / "config" / "sample.log"

EXIT_CODES = {"ConfigError": 3, "DbcError": 3, "ExprError": 3, "OutboxError": 3, "BrokerAddressError": 3,
              "FormatError": 2, "LogError": 1, "WatchError": 1, "RegistryError": 1,
              "MissingExtra": 1}


def gateway_errors() -> dict[str, type[GatewayError]]:
    found: dict[str, type[GatewayError]] = {}
    for mod in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if mod.name.endswith("__main__"):  # runs the CLI
            continue
        m = importlib.import_module(mod.name)
        for name, obj in vars(m).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == m.__name__ and not name.startswith("_")):
                found[name] = obj
    return found


def test_every_public_exception_is_a_gateway_error_in_the_drawn_tree() -> None:
    found = gateway_errors()
    assert set(found) - {"GatewayError"} == set(EXIT_CODES)
    doc = errors.__doc__ or ""
    for name, cls in found.items():
        assert issubclass(cls, GatewayError), name
        assert f"+-- {name} " in doc or name == "GatewayError", f"{name} not in the tree"
        if name != "GatewayError":
            assert cls.exit_code == EXIT_CODES[name], name
            assert f"({cls.__module__}" in doc, f"{name}: the tree names its module"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=False)


@pytest.mark.parametrize("state_dir", ["/dev/null", "/etc/passwd/state"])
def test_replay_with_a_bad_state_dir_ends_in_one_clear_message(tmp_path: Path,
                                                               state_dir: str) -> None:
    cfg = write(tmp_path, extra=f"state_dir: {state_dir}")
    r = run("replay", "-c", str(cfg), "--mqtt", "-", str(SAMPLE_LOG))
    assert r.returncode == cli.EXIT_CONFIG, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0] == "config error:", r.stderr
    assert len(lines) == 2 and lines[1].startswith(f"  {cfg}: state_dir:"), r.stderr
    assert "Fix:" in lines[1] and "Traceback" not in r.stderr and not r.stdout


def test_replay_of_a_missing_log_is_one_runtime_error(tmp_path: Path) -> None:
    r = run("replay", "-c", str(write(tmp_path)), "--mqtt", "-", str(tmp_path / "no.log"))
    assert r.returncode == cli.EXIT_RUNTIME, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no.log" in lines[0]


def test_a_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    r = run("decode", "-c", str(write(tmp_path)), "--log-format", "(?P<nothing>x)",
            str(SAMPLE_LOG))
    assert r.returncode == cli.EXIT_USAGE, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_a_bad_scenario_is_headed_as_such(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("events:\n  - {at: never}\n")
    r = run("simulate", "-c", str(write(tmp_path)), "--scenario", str(scenario), "--out",
            str(tmp_path / "x.log"))
    assert r.returncode == cli.EXIT_CONFIG, r.stderr
    assert r.stderr.startswith("scenario error"), r.stderr
    assert str(scenario) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("module", "argv", "extra"), [
    ("uvloop", ["replay", "--loop", "uvloop", "--mqtt", "-", str(SAMPLE_LOG)], "fast"),
    ("matplotlib", ["plot", str(SAMPLE_LOG), "--out", "x.png"], "plot"),
    ("rich", ["watch", "--log", str(SAMPLE_LOG)], "watch"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, module: str, argv: list[str],
                                                extra: str) -> None:
    """The three optional imports a command needs go through one helper: one line naming
    the extra, exit 1; `--loop uvloop` used to end in a RuntimeError traceback."""
    # a child where the import fails, as on an install without the extra
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from gateway.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, check=False, env={**__import__("os").environ,
                                                                   "PYTHONPATH": str(REPO)})
    assert r.returncode == cli.EXIT_RUNTIME, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and f"bms-gateway[{extra}]" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
