"""Tools: plain Python functions that solver steps run (`tool:` steps in a registry).

A tool is `fn(text: str, images: list[Path], **args) -> ToolOutput | str`. It computes only
from what it receives (the rendered step input and the episode's images). `TOOLS` maps the
names a registry may use to the functions; registries are validated against it.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class ToolOutput:
    text: str
    confidence: float | None = None
    images: tuple[Path, ...] | None = None
    """Images for the following steps (e.g. a crop); None keeps the current ones."""


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def extract_number(text: str, images: list[Path], which: str = "last") -> ToolOutput:
    """The first or last number in the text, commas removed; '' when there is none."""
    nums = _NUMBER.findall(text)
    if not nums:
        return ToolOutput("", confidence=0.0)
    return ToolOutput((nums[0] if which == "first" else nums[-1]).replace(",", ""))


_OPS: dict[type, Callable] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_EXPR = re.compile(r"[-+*/×÷^().%\d\s]+")


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > 64 or abs(left) > 10**12:
                raise ValueError("exponent too large or not an integer")
            return left ** int(right)
        return Fraction(_OPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def format_number(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    f = float(x)
    return f"{f:.6g}" if math.isfinite(f) else str(f)


def calculate(text: str, images: list[Path]) -> ToolOutput:
    """Evaluate the longest arithmetic expression in the text exactly (+ - * / // % ** ^ × ÷)."""
    # a sentence's final period is not part of the expression ("Calculate (3 + 4) / 2.")
    candidates = sorted((m.group(0).strip().rstrip(".").strip() for m in _EXPR.finditer(text)), key=len, reverse=True)
    for expr in candidates:
        if not re.search(r"\d", expr):
            continue
        src = expr.replace("×", "*").replace("÷", "/").replace("^", "**")
        try:
            value = _eval(ast.parse(src, mode="eval"))
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
            continue
        return ToolOutput(format_number(value), confidence=1.0)
    return ToolOutput("no arithmetic expression found", confidence=0.0)


def strip_code_fences(text: str, images: list[Path]) -> ToolOutput:
    """The code inside the first ``` fence, or the text itself."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.DOTALL)
    return ToolOutput(m.group(1) if m else text)




_CODE = re.compile(r"\b(?=[A-Z0-9-]*\d)(?=[A-Z0-9-]*[A-Z])[A-Z0-9]+(?:-[A-Z0-9]+)+\b|\b(?=\w*\d)(?=\w*[A-Z])[A-Z0-9]{4,}\b")


def answer_from_lines(text: str, images: list[Path], question: str = "") -> ToolOutput:
    """Pick what the question asks for from OCR lines: the first/last line, a code, a word,
    or else all the text on one line. Works from the OCR text and the question only."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "(no text found)"]
    if not lines:
        return ToolOutput("", confidence=0.0)
    q = question.lower()
    if "last line" in q or "bottom line" in q:
        return ToolOutput(lines[-1])
    if "first line" in q or "top line" in q or "title" in q:
        return ToolOutput(lines[0])
    if "code" in q:
        codes = [m.group(0) for ln in lines for m in _CODE.finditer(ln)]
        if codes:
            return ToolOutput(codes[0])
    if "digit" in q or "number" in q:
        nums = _NUMBER.findall(" ".join(lines))
        if len(nums) == 1:
            return ToolOutput(nums[0].replace(",", ""))
    if "word" in q and len(lines) == 1 and len(lines[0].split()) == 1:
        return ToolOutput(lines[0])
    return ToolOutput(" ".join(lines))


def first_line(text: str, images: list[Path]) -> ToolOutput:
    """The first non-empty line, without a trailing period (LMs ramble after their answer)."""
    for ln in text.splitlines():
        if ln.strip():
            return ToolOutput(ln.strip().rstrip("."))
    return ToolOutput("")


def _zoom_box(text: str, images: list[Path], **kw) -> ToolOutput:
    from maestro_core.imagetools import zoom_box  # OpenCV loads only when a solver zooms
    return zoom_box(text, images, **kw)


def _chart_answer(text: str, images: list[Path], question: str = "", kind: str = "value") -> ToolOutput:
    from maestro_core.chart_reading import chart_answer
    return chart_answer(text, images, question=question, kind=kind)


TOOLS: dict[str, Callable[..., ToolOutput | str]] = {
    "extract_number": extract_number,
    "calculate": calculate,
    "strip_code_fences": strip_code_fences,
    "answer_from_lines": answer_from_lines,
    "first_line": first_line,
    "zoom_box": _zoom_box,
    "chart_answer": _chart_answer,
}
