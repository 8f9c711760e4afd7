"""Does every dependency install on a Raspberry Pi without a compiler?

Resolves what `pip install 'bms-gateway[fast,serial]'` installs (on this machine, with
pip's resolver), then asks the package index, per dependency and version, for a wheel
that CPython 3.11 on 64-bit Pi OS (aarch64, glibc 2.36) or 32-bit Pi OS (armv7l) can
install. Prints a table; fails when a dependency has no aarch64 wheel. armv7l is
reported, not enforced: PyPI has few armv7l wheels, and Pi OS gets them from piwheels
(which this check cannot reach from every CI machine); see docs/deploy.md.

    python .ci/arm_wheels.py [EXTRAS]      # default EXTRAS: fast,serial
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLIBC = range(17, 37)  # manylinux_2_17 .. manylinux_2_36 (Debian 12's glibc)
ARCHES = {
    "aarch64": ["manylinux2014_aarch64", *(f"manylinux_2_{v}_aarch64" for v in GLIBC),
                "linux_aarch64"],
    "armv7l": ["manylinux2014_armv7l", *(f"manylinux_2_{v}_armv7l" for v in GLIBC),
               "linux_armv7l"],
}


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def resolve(extras: str) -> list[tuple[str, str]]:
    r = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
            f"{ROOT}[{extras}]")
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr else "pip failed")
    report = json.loads(r.stdout)
    out = [(i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"]]
    return sorted(x for x in out if x[0].lower() != "bms-gateway")


def wheel(name: str, version: str, arch: str) -> str:
    plat = [a for p in ARCHES[arch] for a in ("--platform", p)]
    for _attempt in range(2):  # a second try, so one network hiccup is not "no wheel"
        with tempfile.TemporaryDirectory() as d:
            r = pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                    "--implementation", "cp", *plat, "-d", d, "--quiet", f"{name}=={version}")
            files = list(Path(d).glob("*.whl"))
            if r.returncode == 0 and files:
                tag = files[0].name.removesuffix(".whl").split("-", 2)[2]
                return ("pure Python" if tag.endswith("none-any")
                        else tag.split("-")[-1].split(".")[0])
    return "NO WHEEL (sdist: builds on the Pi)"


def main() -> int:
    extras = sys.argv[1] if len(sys.argv) > 1 else "fast,serial"
    try:
        deps = resolve(extras)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"skipped: cannot resolve the dependencies ({e}); no package index reachable?")
        return 0
    jobs = [(n, v, a) for n, v in deps for a in ARCHES]
    with ThreadPoolExecutor(8) as ex:
        found = dict(zip(jobs, ex.map(lambda j: wheel(*j), jobs), strict=True))
    print(f"bms-gateway[{extras}] for CPython 3.11, wheels on the package index:")
    print(f"| {'package':<20} | {'version':<10} | {'aarch64':<36} | {'armv7l':<36} |")
    print(f"|{'-' * 22}|{'-' * 12}|{'-' * 38}|{'-' * 38}|")
    for n, v in deps:
        print(f"| {n:<20} | {v:<10} | {found[n, v, 'aarch64']:<36} | "
              f"{found[n, v, 'armv7l']:<36} |")
    missing = [n for n, v in deps if found[n, v, "aarch64"].startswith("NO WHEEL")]
    if missing:
        print(f"FAIL: no aarch64 wheel for {', '.join(missing)}: 64-bit Pi OS would need a "
              "compiler; pin a version with wheels or document it in docs/deploy.md")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
