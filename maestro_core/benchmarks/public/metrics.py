"""Official metrics of the public benchmarks, as plain functions.

Every function takes ``(prediction: str | None, item: Item)`` (or plain strings where
noted), returns 0.0 or 1.0, returns 0.0 for a None/blank prediction, and never matches
substrings in either direction ("5" never scores against "15", nor "15" against "5").
The prediction is the final answer (what the orchestrator put in its <answer>), not a free
response: the official pipelines that run an LLM to *extract* an answer from a long
response (MathVista, MathVerse, CharXiv) are replaced by ``clean_prediction`` below. Where
an official rule is lenient in a way that amounts to substring or fuzzy matching (MME-
RealWorld's "first capital A-E anywhere", MathVista's "most similar option by edit
distance"), the answer must name an option cleanly instead (see ``choice_accuracy``).

``clean_prediction``: NFKC; whitespace collapsed; the last \\boxed{...}/\\fbox{...} and
surrounding $...$, \\(...\\), **...** unwrapped; one leading answer prefix ("the answer is",
"answer:", ...) and a trailing '.' stripped.

- ChartQA (``relaxed_accuracy``): pix2struct's relaxed correctness, the metric of the
  ChartQA paper: when both sides read as numbers (Python float syntax, optional trailing
  '%' meaning /100, here also comma thousands groups) and the gold is non-zero, correct
  iff |pred - gold| / |gold| <= 0.05; otherwise exact match after normalisation
  (``rewards.normalize_text``: casefold, whitespace, trailing punctuation, quotes). A zero
  gold needs a prediction equal to zero. "104" vs "100" -> 1, "106" vs "100" -> 0, "5"
  vs "15" -> 0; like the original, "45%" reads as 0.45 (so it does not match a gold "45").
- Multiple choice (V* Bench, HR-Bench, MME-RealWorld, and the multiple-choice questions of
  MathVista/MathVerse/MathVision) (``choice_accuracy``): ``rewards.choice``: the prediction
  must pick the gold option by letter ("B", "(B)", "B.", "Option B", "(B) text" when the
  text does not contradict) or by the full text of exactly one option.
- MathVista free-form (``mathvista_accuracy``), per answer_type as in the official
  ``normalize_extracted_answer`` + ``safe_equal``: integer -> int(float(pred)) == gold (the
  official truncation); float -> round(pred, precision) == gold, precision = the gold's
  decimal places (the loader writes float golds with exactly ``precision`` decimals);
  list -> equal after removing whitespace; other text -> ``normalize_text`` equality.
  The prediction's number is the single number in it ("5 cm" -> 5; "5 or 6" -> none).
- CharXiv reasoning (``charxiv_accuracy``): the official grader is an LLM judge; its rules
  are applied deterministically: number answers (reasoning_q_source 3/4) must be equal in
  value (``rewards.numeric``: "1.5e3" == "1500"); text answers must be the same term after
  normalisation (one pair of surrounding parentheses dropped: "(b)" == "b"), and a
  comma-separated list of terms may come in any order. Descriptive questions are not loaded.
- MathVerse / MathVision free-form (``math_accuracy``): ``rewards.math`` (sympy-backed
  equivalence: "\\frac{1}{2}" == "0.5", "2\\sqrt{3}" == "\\sqrt{12}", "60°" == "60").
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

from maestro_core import rewards
from maestro_core.dataset import Item
from maestro_core.rewards import _single_number, _strip_prefix, _unwrap, normalize_text

__all__ = ["CHARTQA_MAX_RELATIVE_CHANGE", "charxiv_accuracy", "choice_accuracy", "clean_prediction",
           "math_accuracy", "mathvista_accuracy", "relaxed_accuracy"]

CHARTQA_MAX_RELATIVE_CHANGE = 0.05


def _check(prediction: object) -> bool:
    """True when there is something to score; TypeError for a non-str (a caller bug)."""
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction must be str or None, got {type(prediction).__name__}")
    return prediction is not None and bool(prediction.strip())


def clean_prediction(text: str) -> str:
    """The final answer inside ``text`` (see the module docstring)."""
    s = " ".join(unicodedata.normalize("NFKC", text).split())
    s = _unwrap(s)
    s = _strip_prefix(s).strip()
    s = _unwrap(s.rstrip(".").strip())
    return s


# --------------------------------------------------------------------------- ChartQA

_FLOAT = re.compile(r"[+-]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _chartqa_float(text: str) -> float | None:
    """pix2struct's ``_to_float``: a float, or a float with a trailing '%' divided by 100."""
    s = text.strip()
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    if not _FLOAT.fullmatch(s):
        return None
    value = float(s.replace(",", ""))
    return value / 100.0 if percent else value


def relaxed_accuracy(prediction: str | None, target: str,
                     max_relative_change: float = CHARTQA_MAX_RELATIVE_CHANGE) -> float:
    """ChartQA relaxed correctness of ``prediction`` against one gold string ``target``."""
    if not isinstance(target, str):
        raise TypeError(f"target must be str, got {type(target).__name__}")
    if not _check(prediction):
        return 0.0
    pred = clean_prediction(prediction)  # type: ignore[arg-type]  # not None: checked
    p, t = _chartqa_float(pred), _chartqa_float(target)
    if p is not None and t is not None:
        if t == 0:
            return 1.0 if p == 0 else 0.0
        return 1.0 if abs(p - t) / abs(t) <= max_relative_change else 0.0
    a, b = normalize_text(pred), normalize_text(target)
    return 1.0 if a and a == b else 0.0


# --------------------------------------------------------------------------- multiple choice

def choice_accuracy(prediction: str | None, item: Item) -> float:
    """1.0 iff the prediction picks the gold option (``rewards.choice``, options from the item)."""
    if not _check(prediction):
        return 0.0
    return rewards.choice(prediction, item.answer, choices=list(item.choices) if item.choices else None)


# --------------------------------------------------------------------------- MathVista

_INT = re.compile(r"[+-]?[0-9]+")
_DEC = re.compile(r"[+-]?[0-9]*\.([0-9]+)")


def mathvista_accuracy(prediction: str | None, item: Item) -> float:
    """MathVista: option match for multiple choice, else the answer_type rule (module docstring)."""
    if item.choices:
        return choice_accuracy(prediction, item)
    if not _check(prediction):
        return 0.0
    pred = clean_prediction(prediction)  # type: ignore[arg-type]
    gold = item.answer.strip()
    if _INT.fullmatch(gold):  # answer_type integer: str(int(float(extraction))) == answer
        value = _single_number(pred)
        try:
            return 1.0 if value is not None and int(value) == int(gold) else 0.0
        except (ArithmeticError, ValueError, OverflowError):
            return 0.0
    if m := _DEC.fullmatch(gold):  # answer_type float: str(round(float(x), precision)) == answer
        value = _single_number(pred)
        if value is None:
            return 0.0
        try:
            return 1.0 if round(float(value), len(m[1])) == float(gold) else 0.0
        except (ArithmeticError, ValueError, OverflowError):
            return 0.0
    if gold.startswith("["):  # answer_type list
        squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
        return 1.0 if squash(pred) == squash(gold) else 0.0
    return rewards.exact(pred, gold)


# --------------------------------------------------------------------------- CharXiv

def _term(s: str) -> str:
    t = normalize_text(s)
    if len(t) >= 2 and t[0] == "(" and t[-1] == ")" and "(" not in t[1:-1]:
        t = t[1:-1].strip()
    return t


def charxiv_accuracy(prediction: str | None, item: Item) -> float:
    """CharXiv reasoning: equal value for number answers, same term(s) for text answers."""
    if not _check(prediction):
        return 0.0
    pred = clean_prediction(prediction)  # type: ignore[arg-type]
    gold = item.answer
    if item.scorer == "numeric":
        return rewards.numeric(pred, gold)
    if "," in gold and not re.search(r"[\[\](){}]", gold):
        a = sorted(_term(t) for t in pred.split(","))
        b = sorted(_term(t) for t in gold.split(","))
        return 1.0 if all(a) and a == b else 0.0
    a, b = _term(pred), _term(gold)
    return 1.0 if a and a == b else 0.0


# --------------------------------------------------------------------------- MathVerse / MathVision

def math_accuracy(prediction: str | None, item: Item) -> float:
    """Option match for multiple choice, else ``rewards.math`` equivalence."""
    if item.scorer == "choice":
        return choice_accuracy(prediction, item)
    if not _check(prediction):
        return 0.0
    return rewards.math(prediction, item.answer)


def format_with_precision(answer: str, precision: object) -> str:
    """A float gold written with exactly ``precision`` decimals ("1.5", 2 -> "1.50")."""
    try:
        places = int(float(precision))  # type: ignore[arg-type]
        if places < 0 or places > 12:
            return answer
        return f"{Decimal(answer.strip()):.{places}f}"
    except (ArithmeticError, ValueError, TypeError):
        return answer
