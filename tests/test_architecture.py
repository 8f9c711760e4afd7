"""The layout's promises (docs/architecture.md), checked on the source tree.

Each test reads gateway/ as text or as a syntax tree; none imports the modules it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "gateway"
MODULES = sorted(PKG.rglob("*.py"))
STAGES = ("source", "decode", "normalize", "faults", "publish")
# what a stage (or the schema and the model beneath them) may never import: the layers above
ABOVE = ("gateway.runtime", "gateway.commands", "gateway.cli", "gateway.entry")


def _rel(p: Path) -> str:
    return p.relative_to(PKG.parent).as_posix()


def _imports(p: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(p.read_text(), str(p))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_tree_exists() -> None:
    # a guard that reads nothing proves nothing
    assert len(MODULES) > 30
    for stage in (*STAGES, "runtime", "commands", "config"):
        assert (PKG / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_over_800_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 800, f"{_rel(path)} has {n} lines: split it by job"


def test_stages_never_import_the_layers_above() -> None:
    low = [p for p in MODULES
           if p.parent.name in (*STAGES, "config") or p.name in ("model.py", "errors.py")]
    bad = [f"{_rel(p)} imports {m}" for p in low for m in _imports(p)
           if any(m == a or m.startswith(a + ".") for a in ABOVE)]
    assert not bad, bad


def test_only_the_schema_reads_yaml() -> None:
    bad = [_rel(p) for p in MODULES
           if "yaml" in _imports(p) and p.parent.name != "config"]
    assert not bad, f"only gateway/config/ parses YAML: {bad}"


def test_no_isinstance_switch_on_sink_types() -> None:
    bad = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "isinstance" and len(node.args) == 2
                    and "Sink" in ast.unparse(node.args[1])):
                bad.append(f"{_rel(p)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


def test_nothing_outside_the_pipeline_touches_its_tables() -> None:
    home = PKG / "runtime" / "pipeline.py"
    bad = []
    for p in MODULES:
        if p == home:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("tables", "_tables"):
                bad.append(f"{_rel(p)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad
