"""The demo tools lfm-chat and the app offer the model: a calculator and the clock (the app adds the battery).

Each runs on the device, takes only what the model wrote as data (tool calls are parsed with `ast`, never
evaluated) and bounds its work: the calculator reads arithmetic from a syntax tree, refuses any operand or
result of more than MAX_DIGITS digits before computing it, and answers `{"error": ...}` instead of raising.
"""

from __future__ import annotations

import ast
import datetime
import math
import operator
from collections.abc import Callable
from typing import Any

__all__ = ["DEMO_TOOLS", "MAX_DIGITS", "calculator", "current_time"]

MAX_DIGITS = 4_000  # of any operand or result (Python turns at most 4,300-digit integers into text)
MAX_CHARS = 200  # of an expression
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculator(expression: str) -> dict:
    """Evaluate arithmetic with + - * / ** and parentheses.

    Args:
        expression: the arithmetic expression, e.g. "2 * (3 + 4)"
    """
    if not isinstance(expression, str):
        return {"error": f"expression must be text, got {type(expression).__name__}"}
    if len(expression) > MAX_CHARS:
        return {"error": f"expression too long (at most {MAX_CHARS} characters)"}
    try:
        result = _value(ast.parse(expression.strip(), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError) as e:
        return {"error": str(e) or type(e).__name__}
    if isinstance(result, float) and not math.isfinite(result):
        return {"error": "the result is not a finite number"}
    return {"result": result}


def _digits(x: int | float) -> float:
    """Decimal digits of |x|, from its logarithm (counting them exactly costs as much as printing them)."""
    return math.log10(abs(x)) + 1 if x else 1


def _value(node: ast.AST) -> int | float:
    # arithmetic on numeric literals only; anything else is refused, never evaluated
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if _digits(node.value) > MAX_DIGITS:
            raise ValueError(f"a number of more than {MAX_DIGITS} digits")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_DIGITS * 4:
                raise ValueError("exponent too large")
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) + 1 > MAX_DIGITS:
                raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        elif isinstance(node.op, ast.Mult) and _digits(left) + _digits(right) > MAX_DIGITS + 1:
            raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        result = _OPS[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ValueError("the result is not a real number")
        if _digits(result) > MAX_DIGITS:
            raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        return result
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def current_time() -> dict:
    """The device's local date and time."""
    return {"now": datetime.datetime.now().isoformat(timespec="seconds")}


DEMO_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "current_time": current_time}
