"""The performance guard (issue 6): `python -m bench --short --check` as CI runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import MOSQUITTO, REPO


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_bench_short_guard_passes() -> None:
    p = subprocess.run([sys.executable, "-m", "bench", "--short", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "check: no ratio fell below" in p.stdout
