"""Maestro-Mini `math`: arithmetic expressions and short word problems, text only.

Sources (reasoning-gym 0.1.25, procedural, offline), in a fixed cycle of ten items:
  - 4/10 `basic_arithmetic`: "Calculate ( 56 + -33 ) - 84." (2-5 terms, 1-3 digits, + - * /,
    parentheses, negation);
  - 4/10 `chain_sum`: "State the final answer to the following arithmetic problem: 57 + 87 + 70 =";
  - 2/10 `gsm_symbolic`: GSM8K-style word problems ("... Give the result as your final answer.
    Do not include units.").
Questions and answers are reasoning-gym's, sent as-is. Checks made on every item:
  - arithmetic: the question contains reasoning-gym's expression verbatim and that expression,
    evaluated EXACTLY (fractions, true division), equals the answer. reasoning-gym computes
    with floor division, so an expression whose division is not exact (its answer would be
    wrong for a calculator) is skipped, as is any |answer| > 10^6;
  - every answer is one number the `numeric` scorer reads (it scores the gold against itself).
A skipped source draw moves on to the next source index of the same item, deterministically.

What solves it: `calc` on the expression (the arithmetic items); the word problems need an LM
to turn the text into an expression, then `calc` for the arithmetic.
"""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path
from typing import Any

from maestro_core.benchmarks._common import Progress, check_args, item_id, stable_int
from maestro_core.dataset import Item
from maestro_core.rewards import score_answer

BENCHMARK = "math"
ID_PREFIX = "math"
SCORER = "numeric"

KIND_CYCLE = ("basic_arithmetic", "chain_sum", "basic_arithmetic", "chain_sum", "gsm_symbolic",
              "basic_arithmetic", "chain_sum", "basic_arithmetic", "chain_sum", "gsm_symbolic")
"""Item i uses KIND_CYCLE[i % 10]: 40% basic_arithmetic, 40% chain_sum, 20% gsm_symbolic."""

SOURCE_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 5, "min_digits": 1, "max_digits": 3,
                         "format_style": "simple", "whitespace": "single"},
    "chain_sum": {"min_terms": 2, "max_terms": 5, "min_digits": 1, "max_digits": 3},
    "gsm_symbolic": {},
}
MAX_ABS_ANSWER = 10**6
ATTEMPTS = 16
"""Source draws tried per item; item i uses source indices i*ATTEMPTS .. i*ATTEMPTS+15."""


def _datasets(seed: int, size: int) -> dict[str, Any]:
    # `size` only bounds the indices: gsm_symbolic draws its template list with
    # Random(seed).choices(k=size), whose first entries do not depend on k, and costs O(size)
    import reasoning_gym as rg

    return {kind: rg.create_dataset(kind, size=size, seed=stable_int(seed, BENCHMARK, kind, bits=31), **cfg)
            for kind, cfg in SOURCE_CONFIGS.items()}


def exact_eval(expression: str) -> Fraction:
    """Evaluate + - * / and unary minus on integers exactly (true division). Raises
    ValueError on anything else (names, calls, powers) and ZeroDivisionError."""
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError(f"unsupported syntax in {expression!r}: {type(node).__name__}")

    return ev(ast.parse(expression, mode="eval"))


def _valid(kind: str, entry: dict[str, Any]) -> bool:
    q, a = entry["question"], str(entry["answer"])
    if score_answer(a, a, SCORER) != 1.0:
        return False
    if kind == "gsm_symbolic":
        return True
    expr = entry["metadata"]["expression"]
    if expr not in q:
        return False
    try:
        value = exact_eval(expr)
    except (ValueError, ZeroDivisionError, SyntaxError):
        return False
    return value.denominator == 1 and str(value.numerator) == a and abs(value) <= MAX_ABS_ANSWER


def generate_with_meta(n: int, seed: int, image_dir: Path | None = None, *, start: int = 0,
                       progress: Progress | None = None) -> list[tuple[Item, dict[str, Any]]]:
    """Items start..start+n-1 with their side-table metadata (kind, source, expression)."""
    check_args(n, start)
    sources = _datasets(seed, (start + n) * ATTEMPTS + 1)
    out = []
    for k, i in enumerate(range(start, start + n)):
        kind = KIND_CYCLE[i % len(KIND_CYCLE)]
        for attempt in range(ATTEMPTS):
            src_index = i * ATTEMPTS + attempt
            entry = sources[kind][src_index]
            if _valid(kind, entry):
                break
        else:  # pragma: no cover - never seen: every item finds a valid draw within 16 tries
            raise RuntimeError(f"math item {i}: no valid {kind} draw in {ATTEMPTS} attempts")
        item = Item(id=item_id(ID_PREFIX, i), benchmark=BENCHMARK, question=entry["question"],
                    answer=str(entry["answer"]), scorer=SCORER)
        meta = {"kind": kind, "source_index": src_index,
                "expression": entry["metadata"].get("expression")}
        out.append((item, meta))
        if progress:
            progress(k + 1, n)
    return out


def generate(n: int, seed: int, image_dir: Path | None = None, *, start: int = 0,
             progress: Progress | None = None) -> list[Item]:
    """`n` items for `seed` (no images; `image_dir` is accepted for a uniform signature)."""
    return [item for item, _ in generate_with_meta(n, seed, image_dir, start=start, progress=progress)]
