"""`calculator`: arithmetic by a parser over Python's expression grammar, never `eval`.

Only numbers, + - * / // % **, parentheses, a few math functions and constants are accepted;
operand sizes are bounded so that no expression can take long or much memory.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from services.agent.tools.base import ToolContext, ToolError
from services.agent.tools.sandbox import ToolSandbox

MAX_MAGNITUDE = 1e300
MAX_EXPONENT = 1024
MAX_NODES = 200
MAX_DIGITS = 308  # round()'s ndigits: a float has no digits beyond these

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculatorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expression: Annotated[str, Field(min_length=1, max_length=200)]


def evaluate(expression: str) -> float | int:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError("not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError("expression too long")
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise ToolError(f"math error: {exc}") from None
    return value


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent over {MAX_EXPONENT}")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        args = [_eval(a) for a in node.args]
        if node.func.id == "round" and len(args) > 1 and abs(args[1]) > MAX_DIGITS:
            # round(x, -n) builds 10**n first: bounded before it is built.
            raise ToolError(f"round's ndigits must be within ±{MAX_DIGITS}")
        return _bounded(_FUNCTIONS[node.func.id](*args))
    raise ToolError(f"not allowed in an expression: {ast.unparse(node)[:40]!r}")


def _bounded(value: Any) -> Any:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError("number too large")
    return value


async def calculator(args: CalculatorArgs, ctx: ToolContext) -> dict[str, Any]:
    """Evaluated in the tool sandbox: bounded above, and off the event loop with a time cap."""
    sandbox: ToolSandbox = ctx.services.sandbox
    return await sandbox.call("calculator", args.model_dump(), ctx.deadline)


def calculate(expression: str) -> dict[str, Any]:
    """The sandbox worker's side."""
    return {"expression": expression, "result": evaluate(expression)}
