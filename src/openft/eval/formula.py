"""The `calculate_output` formula of a `multi` grader, e.g.
`0.5 * fuzzy + 0.5 * max(exact, 0.2)`.

Arithmetic over the sub-graders' rewards, by name: numbers, + - * / ^ (power, as
OpenAI writes it; ** is taken too), parentheses, and the functions min, max, abs,
floor, ceil, exp, sqrt, log. The text is parsed with Python's `ast` and only
those node kinds are accepted, so a formula can never call anything else.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, *_BINARY, *_UNARY)


class FormulaError(ValueError):
    """The formula does not parse, names an unknown grader, or cannot be computed."""


@dataclass(frozen=True)
class Formula:
    text: str
    tree: ast.Expression
    names: frozenset[str]

    def __call__(self, values: dict[str, float]) -> float:
        try:
            result = _eval(self.tree.body, values)
        except (ArithmeticError, ValueError) as e:  # 1/0, sqrt(-1), log(0)
            raise FormulaError(f"calculate_output {self.text!r} could not be computed: {e}") from None
        if isinstance(result, complex) or not math.isfinite(result):
            raise FormulaError(f"calculate_output {self.text!r} gave {result}, not a finite number")
        return float(result)


def parse_formula(text: str, names: set[str]) -> Formula:
    """The checked formula; `names` are the variables it may use."""
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise FormulaError(f"calculate_output {text!r} does not parse: {e.msg} at column {e.offset}") from None
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise FormulaError(f"calculate_output: only {', '.join(FUNCTIONS)} can be called")
        elif isinstance(node, ast.Name):
            if node.id not in FUNCTIONS:
                used.add(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise FormulaError(f"calculate_output: {node.value!r} is not a number")
        elif not isinstance(node, _ALLOWED):
            raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed (arithmetic only)")
    unknown = sorted(used - names)
    if unknown:
        raise FormulaError(
            f"calculate_output names {', '.join(unknown)}, which no grader has (graders: {', '.join(sorted(names))})"
        )
    return Formula(text, tree, frozenset(used))


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)  # float arithmetic: 9^9^9 overflows at once instead of computing for hours
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args))
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed")
