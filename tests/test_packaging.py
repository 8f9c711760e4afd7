"""The wheel a Pi owner installs (issue 13), as docs/deploy.md installs it.

Builds the sdist and, from it, the wheel (so a file missing from the sdist fails here),
installs the wheel into a fresh venv laid out like /opt/bms-gateway, and uses it from
another directory: the example config, profiles, DBCs and systemd files must come from
the venv's share/bms-gateway, never from this checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the `build` package: pip install -e '.[test]' again")
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    r = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO, cwd=tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheels = list(dist.glob("bms_gateway-*-py3-none-any.whl"))
    assert len(wheels) == 1 and list(dist.glob("bms[-_]gateway-*.tar.gz"))
    venv = tmp / "opt" / "bms-gateway"
    r = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    assert r.returncode == 0, r.stderr
    r = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
             "--quiet", "--disable-pip-version-check", wheels[0], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def test_wheel_installs_the_command_and_the_shared_files(installed: Path) -> None:
    share = installed / "share" / "bms-gateway"
    for rel in ("config/gateway.example.yaml", "config/sample.log", "profiles/example-bms.yaml",
                "profiles/can-bms.yaml", "dbc/example-bms.dbc", "systemd/80-can0.network"):
        assert (share / rel).is_file(), rel
    # the unit in the wheel is the one in the repository, which CI verifies
    unit = share / "systemd" / "bms-gateway.service"
    assert unit.read_bytes() == (REPO / "systemd" / "bms-gateway.service").read_bytes()
    assert (installed / "bin" / "bms-gateway").is_file()
    r = _run(installed / "bin" / "python", "-c", "import gateway; print(gateway.__file__)",
             cwd=installed.parent)
    assert Path(r.stdout.strip()).is_relative_to(installed), "imported from the checkout"


def test_installed_gateway_checks_its_example_config_from_elsewhere(installed: Path,
                                                                     tmp_path: Path) -> None:
    example = installed / "share" / "bms-gateway" / "config" / "gateway.example.yaml"
    r = _run(installed / "bin" / "bms-gateway", "check-config", "-c", example, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{example}: OK" in r.stdout
    assert f"DBC {installed / 'share' / 'bms-gateway' / 'dbc' / 'example-bms.dbc'}" in r.stdout
    # without -c the built-in example is the installed one too
    r = _run(installed / "bin" / "bms-gateway", "check-config", cwd=tmp_path)
    assert r.returncode == 0 and f"{example}: OK" in r.stdout, r.stdout + r.stderr


def test_installed_gateway_replays_the_bundled_sample(installed: Path, tmp_path: Path) -> None:
    sample = installed / "share" / "bms-gateway" / "config" / "sample.log"
    r = _run(installed / "bin" / "bms-gateway", "replay", sample, "--speed", "max",
             cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("bms/house/cells ") >= 10


def test_missing_interface_extra_is_named(installed: Path, tmp_path: Path) -> None:
    """The bare wheel has no pyserial: an slcan config says which extra to install."""
    if _run(installed / "bin" / "python", "-c", "import serial", cwd=tmp_path).returncode == 0:
        pytest.skip("pyserial is importable in the fresh venv (a system site package?)")
    cfg = tmp_path / "slcan.yaml"
    cfg.write_text("can: {interface: slcan, channel: /dev/ttyACM0, bitrate: 500000}\n"
                   "packs: [{id: house, profile: example-bms}]\n")
    for cmd in ("check-config", "run"):
        r = _run(installed / "bin" / "bms-gateway", cmd, "-c", cfg, cwd=tmp_path, timeout=60)
        assert r.returncode == 3, (cmd, r.stdout, r.stderr)
        assert "can.interface: interface 'slcan' needs the Python module 'serial'" in r.stderr
        assert "pip install 'bms-gateway[serial]'" in r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_installed_unit_verifies(installed: Path, tmp_path: Path) -> None:
    unit = installed / "share" / "bms-gateway" / "systemd" / "bms-gateway.service"
    r = _run("sh", REPO / "systemd" / "verify.sh", unit, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: ok" in r.stdout
