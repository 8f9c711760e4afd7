"""Profile expressions (`expr:`) and conversions: an expression is checked once on sample
inputs, then re-emitted as Python from a whitelist of nodes (nothing from a profile is
ever evaluated as code); `evaluate` computes one for given signal values (the check here,
and the simulator inverting an expression); `linear` is a value's conversion to model
units (scale, offset, unit, invert)."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

from gateway.config import ValueSpec
from gateway.errors import EXIT_CONFIG, GatewayError

EXPR_MAX_CHARS = 1000
EXPR_MAX_DEPTH = 40
_EXPR_SAMPLES = (1.0, 2.0, 0.5, -3.0, 1000.0)
_EXPR_ARGS = {"abs": (1, 1), "min": (2, 64), "max": (2, 64)}
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}
_OPS: dict[type[ast.operator], tuple[str, Callable[[float, float], float]]] = {
    ast.Add: ("+", lambda a, b: a + b), ast.Sub: ("-", lambda a, b: a - b),
    ast.Mult: ("*", lambda a, b: a * b), ast.Div: ("/", lambda a, b: a / b)}
_FIX = "use signal names, numbers, + - * / and min/max/abs"


class ExprError(GatewayError):
    """An expression outside the whitelist: args (what, fix)."""

    exit_code = EXIT_CONFIG


def parse(text: str) -> ast.Expression | tuple[str, str]:
    """The expression's syntax tree, or why it is unusable as (what, fix)."""
    if (problem := expr_problem(text)) is not None:
        return problem
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError as e:
        return f"not an expression: {e.msg}", _FIX


def expr_problem(text: str) -> tuple[str, str] | None:
    """Why an expression would fail on every frame (or could not even be compiled), as
    (what, fix); None when it is usable. check-config runs it once on sample inputs, so
    `1e999`, `max()` or `x / 0` are rejected there, not counted as errors at run time."""
    fix = "use signal names, finite numbers, + - * / and min(a, b), max(a, b), abs(a)"
    if len(text) > EXPR_MAX_CHARS:
        return f"is {len(text)} characters long, more than {EXPR_MAX_CHARS}", fix
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None  # reported with its message by the compiler
    except (RecursionError, MemoryError):
        return "is nested too deeply to compile", fix
    depth: dict[int, int] = {id(tree): 0}
    for node in ast.walk(tree):
        d = depth[id(node)]
        if d > EXPR_MAX_DEPTH:
            return f"is nested more than {EXPR_MAX_DEPTH} levels deep", fix
        for child in ast.iter_child_nodes(node):
            depth[id(child)] = d + 1
        if isinstance(node, ast.Constant) and isinstance(node.value, float) \
                and not math.isfinite(node.value):
            return f"the number {ast.get_source_segment(text, node) or node.value} is not " \
                   "finite (too large for a float)", fix
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _EXPR_ARGS:
            lo, hi = _EXPR_ARGS[node.func.id]
            if not lo <= len(node.args) <= hi:
                want = "one argument" if lo == hi else f"{lo} to {hi} arguments"
                return f"{node.func.id}() takes {want}, got {len(node.args)}", fix
    def trial(sample: float) -> float:  # every signal set to `sample`
        return evaluate(tree, lambda _name: sample)

    failures: list[str] = []
    for sample in _EXPR_SAMPLES:
        try:
            value = trial(sample)
        except (ArithmeticError, TypeError, ValueError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            continue
        except ExprError:
            return None  # not allowed syntax: the compiler says which
        if math.isfinite(value):
            return None
        failures.append(f"gives {value}")
    return (f"fails for every input value tried ({', '.join(map(str, _EXPR_SAMPLES))}): "
            f"{failures[0]}"), fix


def evaluate(node: ast.AST, value: Callable[[str], float]) -> float:
    """A whitelisted expression's value, each signal name's value given by `value`;
    ExprError for a node outside the whitelist."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, value)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        return value(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)][1](evaluate(node.left, value), evaluate(node.right, value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = evaluate(node.operand, value)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in _FUNCTIONS and not node.keywords:
        return float(_FUNCTIONS[node.func.id](*(evaluate(a, value) for a in node.args)))
    raise ExprError(f"{type(node).__name__} is not allowed",
                    "only signal names, numbers, + - * /, min(), max(), abs()")


def to_python(node: ast.AST, name: Callable[[str], str],
              attribute: Callable[[str, str], str] | None = None) -> str:
    """A whitelisted expression as Python source: `name` gives the code of a bare signal
    name, `attribute` that of a `Message.Signal` (None: not allowed here)."""
    def emit(node: ast.AST) -> str:
        if isinstance(node, ast.Expression):
            return emit(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return repr(node.value)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if attribute is None:
                raise ExprError(f"{node.value.id}.{node.attr}: a Message.Signal name "
                                "next to `message:`",
                                "remove `message:` and write every name as Message.Signal")
            return attribute(node.value.id, node.attr)
        if isinstance(node, ast.Name):
            return name(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return f"({emit(node.left)} {_OPS[type(node.op)][0]} {emit(node.right)})"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return f"({'-' if isinstance(node.op, ast.USub) else '+'}{emit(node.operand)})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCTIONS and not node.keywords:
            return f"{node.func.id}({', '.join(emit(a) for a in node.args)})"
        raise ExprError(f"{type(node).__name__} is not allowed",
                        "only signal names, numbers, + - * /, min(), max(), abs()")

    return emit(node)


def linear(expr: str, spec: ValueSpec) -> str:
    """`expr` converted to model units by the spec's scale, offset, unit and invert."""
    f, o = spec.factor_offset()
    if spec.scale != 1 or spec.offset != 0:
        expr = f"({expr} * {spec.scale!r} + {spec.offset!r})" if spec.offset else \
            f"({expr} * {spec.scale!r})"
    if f != 1:
        expr = f"({expr} * {f!r})"
    if o:
        expr = f"({expr} + {o!r})"
    if spec.invert:
        expr = f"(-{expr})"
    return expr


def literal(x: float) -> str:
    """A number as Python source; infinities have no literal."""
    if math.isinf(x):
        return "_INF" if x > 0 else "-_INF"
    return repr(x)
