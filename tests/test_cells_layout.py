"""The pieces normalize and the simulator share: where a signal starts in the frame (the
order of cells by position), the number in a cell signal's name, a cells: source's slots
with the problems normalize reports, and one expression evaluator that agrees with the
Python the compiler generates from the same expression."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import cantools
import pytest

from gateway.config import CellSource
from gateway.decode.dbc import bitfield
from gateway.normalize.cells import bit_position, cell_slots, cells_per_group, name_number
from gateway.normalize.expr import ExprError, evaluate, expr_problem, to_python
from tests.conftest import REPO

LAYOUT_DBC = """\
VERSION ""

NS_ :

BS_:

BU_: BMS

BO_ 1296 Cells: 8 BMS
 SG_ Cell_3 : 32|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell_1 : 0|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell_2 : 16|16@1+ (1,0) [0|0] "mV" Vector__XXX
 SG_ Cell_1_invalid : 48|1@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Cell_3_invalid : 50|1@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Spare : 56|8@1+ (1,0) [0|0] "" Vector__XXX

BO_ 1297 BigCells: 8 BMS
 SG_ B2 : 23|16@0+ (1,0) [0|0] "mV" Vector__XXX
 SG_ B1 : 7|16@0+ (1,0) [0|0] "mV" Vector__XXX
 SG_ B3 : 39|16@0+ (1,0) [0|0] "mV" Vector__XXX
"""


def test_bit_position_orders_like_the_decoders_bit_fields() -> None:
    """Frame order from the DBC's start bit equals the order of the generated readers'
    bit fields, for every signal of every DBC the project ships."""
    seen = 0
    for path in sorted((REPO / "dbc").glob("*.dbc")):
        db = cantools.database.load_file(str(path), strict=False)
        for msg in db.messages:
            for sig in msg.signals:
                bf = bitfield(msg, sig)
                want = (msg.length * 8 - 1 - bf.shift - (bf.length - 1) if bf.big_endian
                        else bf.shift)
                assert bit_position(sig) == want, (path.name, msg.name, sig.name)
                seen += 1
    assert seen > 100


@pytest.mark.parametrize(("name", "number"), [
    ("Cell_12", 12), ("Cell12_invalid", 12), ("Module2_Cell07", 7), ("T3Flag", 3),
    ("Cell_5_valid", 5), ("Voltage", None), ("Cell_invalidFlag", None)])
def test_name_number_ignores_a_trailing_flag_word(name: str, number: int | None) -> None:
    assert name_number(name) == number


def _db(tmp: Path) -> cantools.database.Database:
    (tmp / "layout.dbc").write_text(LAYOUT_DBC)
    return cantools.database.load_file(str(tmp / "layout.dbc"))


def test_slots_by_position_and_by_name(tmp_path: Path) -> None:
    db = _db(tmp_path)
    msg = db.get_message_by_name("Cells")
    values = [msg.get_signal_by_name(n) for n in ("Cell_3", "Cell_1", "Cell_2")]
    flags = [msg.get_signal_by_name(n) for n in ("Cell_3_invalid", "Cell_1_invalid")]

    by_pos, problem = cell_slots(CellSource("k", "Cells", "Cell_*"), values, [])
    assert problem is None
    assert [(slot, s.name, inv) for slot, s, inv in by_pos[None]] == [
        (0, "Cell_1", None), (1, "Cell_2", None), (2, "Cell_3", None)]

    src = CellSource("k", "Cells", "Cell_*", order="name", invalid="Cell_*_invalid")
    by_name, problem = cell_slots(src, values, flags)
    assert problem is None
    assert [(slot, s.name, inv and inv.name) for slot, s, inv in by_name[None]] == [
        (2, "Cell_3", "Cell_3_invalid"), (0, "Cell_1", "Cell_1_invalid"), (1, "Cell_2", None)]
    assert cells_per_group(src, "voltages", by_name) == 3

    big = db.get_message_by_name("BigCells")
    slots, _ = cell_slots(CellSource("k", "BigCells", "B*"), list(big.signals), [])
    assert [s.name for _, s, _ in slots[None]] == ["B1", "B2", "B3"]


def test_slot_problems_are_what_normalize_reports(tmp_path: Path) -> None:
    msg = _db(tmp_path).get_message_by_name("Cells")
    values = [msg.get_signal_by_name(n) for n in ("Cell_1", "Cell_2", "Spare")]
    slots, problem = cell_slots(CellSource("k", "Cells", "x", order="name"), values, [])
    assert problem == ("order", "signal 'Spare' has no number in its name",
                       "use order: position")
    assert [s.name for _, s, _ in slots[None]] == ["Cell_1", "Cell_2"]  # the simulator's

    flag = [msg.get_signal_by_name("Cell_1_invalid")]
    slots, problem = cell_slots(CellSource("k", "Cells", "x"), values, flag)
    assert problem is not None and problem[:2] == ("invalid", "1 invalid flags for 3 values")
    assert all(inv is None for _, _, inv in slots[None])


@pytest.mark.parametrize("text", [
    "a * 0.1 - 40", "-(a + 2) / 4", "max(a, 3) + min(a, -1, 2)", "abs(a - 10) * +2", "7"])
def test_evaluate_agrees_with_the_generated_python(text: str) -> None:
    tree = ast.parse(text, mode="eval")
    assert expr_problem(text) is None
    code = to_python(tree, lambda name: "a")
    for a in (0.0, 1.5, -12.0, 400.0):
        assert math.isclose(evaluate(tree, {"a": a}.__getitem__),
                            eval(code, {"__builtins__": {"min": min, "max": max, "abs": abs}},
                                 {"a": a}))


@pytest.mark.parametrize("text", ["a ** 2", "a if a else 1", "round(a)", "a[0]", "min(a, key=b)"])
def test_outside_the_whitelist_neither_evaluates_nor_compiles(text: str) -> None:
    tree = ast.parse(text, mode="eval")
    with pytest.raises(ExprError):
        evaluate(tree, lambda name: 1.0)
    with pytest.raises(ExprError):
        to_python(tree, lambda name: name)
