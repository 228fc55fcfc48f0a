"""Rewards: outcome scorers, the format term, the cost term and their sum.

Maestro trains with outcome-only RL (GRPO): an episode's reward is

    total = outcome + format_score + cost_term

- ``outcome`` in {0.0, 1.0}: does the final answer match the gold answer? One of the
  scorers below decides (``exact``, ``numeric``, ``choice``, ``math``).
- ``format_score``: 0.0 when every turn was a valid action and the episode ended with an
  answer, else ``-format_penalty`` (the paper uses 0 or -1).
- ``cost_term``: ``-cost_lambda * cost / cost_scale``; 0.0 with the default cost_lambda=0
  (and 0.0 on a wrong answer with ``cost_on_success``).

Rewards are plain functions, as in TRL. Typical use::

    from maestro_core.rewards import RewardConfig, compute_reward, score_answer

    score_answer("\\\\boxed{\\\\frac{1}{2}}", "0.5", "math")          # -> 1.0
    rb = compute_reward("B", "(b)", "choice", n_invalid_turns=0, answered=True,
                        cost=0.002, config=RewardConfig(cost_lambda=0.1))
    rb.total                                                         # 1.0 - 0.2 = 0.8

Every scorer has the form ``scorer(prediction: str | None, answer: str, **options) -> float``,
returns exactly 0.0 or 1.0, returns 0.0 for a None or blank prediction, and never raises
on any text (a non-str argument is a caller bug and raises TypeError). All scorers accept
``choices=`` (only ``choice`` uses it) so ``score_answer`` can pass it to any of them.

No scorer matches substrings in either direction: "5" never scores against "15", "15"
never against "5", and "5 and 15" never against "5".

Normalisation rules
-------------------
``exact`` (``normalize_text``), applied to both sides, repeated until nothing changes:
  1. Unicode NFKC, then casefold (NFKC again after casefold so the result is stable).
  2. Whitespace: strip the ends, collapse every inner run to one space.
  3. Strip one leading answer prefix from ``ANSWER_PREFIXES`` (a fixed list, matched as a
     whole phrase after casefolding, with any ':' and spaces after it):
     "the final answer is", "final answer is", "final answer:", "the answer is",
     "answer is", "answer:".
  4. Strip trailing punctuation ``. , ; : ! ?`` and the ideographic full stop.
  5. Strip one pair of surrounding quotes: "..." '...' `...` “...” ‘...’ «...».
  Equal iff the normalised strings are equal and non-empty. Nothing else is removed
  (no articles, no LaTeX, no markdown).

``numeric``:
  - Preparation: superscript digits become "^d" (so "5²" is not read as 52), NFKC,
    Unicode minus and fraction slash become '-' and '/', LaTeX "\\$", "\\%", "{,}" become
    "$", "%", ","; a surrounding \\boxed{...} (the last one) or $...$ is unwrapped.
  - The text is split into tokens on whitespace and '='. Each token loses leading
    ``( [ { " ' * _ ` “ ‘`` and trailing ``. , ; : ? ) ] } " ' * _ ` ” ’``.
  - A token is a number when it is entirely: an optional sign, an optional currency
    symbol ($ € £ ¥), an optional sign, then an integer/decimal with optional comma
    thousands groups ("1,234,567.5"; groups must be exactly 3 digits) and optional
    exponent ("1.5e-3"), or a fraction of integers ("3/4"); then an optional '%'.
  - '$' and '%' are units and are dropped: "$5" == "5" and "5%" == "5" (so "5%" != "0.05").
    Gold answers in GSM8K/MATH-style sets state percentages without the sign.
  - Words without digits are ignored ("about 5 apples" reads as 5, "x = 5" as 5).
    A token that has a digit but is not a number ("5-10", "2x", "1,00", "3rd", "5!")
    makes the whole text unreadable -> 0.0. Exactly one number is required: "15 or 5"
    -> 0.0. "inf" and "nan" are words, not numbers.
  - Comparison: when both values are integers they must be equal exactly (a relative
    tolerance would call 1000000 and 1000001 equal). Otherwise
    ``|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)`` with rel_tol=1e-6 and abs_tol=1e-9
    by default: wide enough for float noise ("0.30000000000000004" == "0.3"),
    narrow enough that "0.333" != "1/3".

``choice``:
  - Preparation: NFKC, whitespace collapsed, \\boxed{...}/$...$/**...** unwrapped, one
    answer prefix stripped (as in ``exact``), trailing '.' stripped.
  - Read as a letter when the text is a single letter, optionally preceded by "option" or
    "choice", optionally in parentheses/brackets, optionally followed by '.', ':' or ')':
    "B", "(B)", "B.", "b)", "[b]", "Option B". Case does not matter.
  - Or a letter followed by such a delimiter and text: "b) Paris", "(B) Paris", "B. Paris".
    When ``choices`` is given and that text is exactly (``normalize_text``) another
    option's text, the answer contradicts itself -> 0.0.
  - Or, when ``choices`` is given, the full text of exactly one option ("Paris").
  - Anything else ("A or B", "I think B") is unreadable -> 0.0. With ``choices``, a letter
    past the last option is unreadable. The gold answer is read the same way.

``math``:
  - Preparation: as ``numeric`` (superscripts, NFKC, \\boxed/$ unwrapped), then one answer
    prefix, trailing '.', "\\left"/"\\right"/thin spaces, "^\\circ", "%", "\\%", "$" are removed,
    comma thousands groups are joined, "\\text{...}" units are dropped, and "x = RHS" with
    one '=' and a plain variable name on the left becomes RHS.
  - LaTeX-light: \\frac, \\dfrac, \\tfrac (also \\frac12), \\sqrt{.}, \\sqrt[n]{.}, \\cdot,
    \\times, \\div, \\pi, \\infty, ^, {}, \\mathrm{}/\\mathbf{}/\\textbf{} and Greek letters.
    Any other command, a comma, '=', '!', '//', '()', or "2 3" (digits split by a space)
    makes the text unparseable; leading zeros are dropped ("05" is 5). Plain text is parsed by sympy's parse_expr with implicit multiplication
    ("2x", "2(x+1)", "x(y+1)") but without splitting names ("xy" is one symbol).
  - Bounded parsing (sympy can hang or exhaust memory): at most ``MATH_MAX_CHARS`` (200)
    characters after preparation; only digits, ASCII letters, + - * / ( ) . and spaces
    survive into parse_expr (no Python keywords, no attribute access); names are either
    sqrt/pi/oo or plain Symbols; the expression is first built unevaluated and rejected
    when its estimated size exceeds ``MATH_MAX_DIGITS`` decimal digits (10^10^10, power
    towers); every exception means "unparseable".
  - Equivalence: structurally equal -> 1. Constants: both exact rationals must be equal
    exactly; otherwise their 30-digit values compare as in ``numeric`` ("\\sqrt{2}" ==
    "1.414214"). With symbols: the two sides are evaluated at 6 fixed random points
    (both signs); any disagreement -> 0; agreement at >= 3 points where both are finite
    -> 1 (a polynomial identity test: cheap, bounded, thread-safe). Only when the points
    cannot decide (undefined functions, non-finite values) is ``simplify(a - b) == 0``
    tried, under a ``timeout_s`` SIGALRM time limit; that limit exists only on the main
    thread of a POSIX process, so elsewhere the undecided pair scores 0.
  - Which judge decides is picked by the gold answer: a gold that parses as math -> sympy
    (a prediction that does not parse scores 0, so "5 apples" != "5" under ``math``); else
    a gold that is one number -> ``numeric``; else ``exact`` on the prepared text with
    \\text{...} unwrapped.
"""

from __future__ import annotations

import functools
import keyword
import math as _pymath
import random
import re
import signal
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation, MAX_EMAX, MIN_EMIN
from decimal import DivisionByZero as _DecDivisionByZero
from decimal import Overflow as _DecOverflow
from typing import Any

from maestro_core.errors import ConfigError

__all__ = [
    "ANSWER_PREFIXES", "MATH_MAX_CHARS", "MATH_MAX_DIGITS", "SCORERS", "Scorer",
    "RewardBreakdown", "RewardConfig", "choice", "compute_reward", "cost_reward", "exact",
    "format_reward", "get_scorer", "math", "normalize_text", "numeric", "score_answer",
    "total_reward",
]

Scorer = Callable[..., float]
"""``scorer(prediction: str | None, answer: str, **options) -> float`` in {0.0, 1.0}."""

ANSWER_PREFIXES: tuple[str, ...] = (
    "the final answer is", "final answer is", "final answer:", "the answer is", "answer is",
    "answer:",
)
"""Leading phrases stripped before comparing (casefolded, longest first)."""

MATH_MAX_CHARS = 200
"""Longest prepared text the math scorer hands to sympy; longer text is unparseable."""

MATH_MAX_DIGITS = 2000
"""Largest estimated size (decimal digits, or total exponent for symbols) sympy may build."""

DEFAULT_REL_TOL = 1e-6
DEFAULT_ABS_TOL = 1e-9
DEFAULT_MATH_TIMEOUT_S = 2.0


# --------------------------------------------------------------------------- helpers

def _check_args(prediction: object, answer: object) -> None:
    # Wrong types are caller bugs (a dataset loader that kept an int); say so rather
    # than silently scoring 0 for a whole benchmark.
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction must be str or None, got {type(prediction).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"answer must be str, got {type(answer).__name__}; convert the "
                        "dataset's gold answers to str when loading them")


def _blank(prediction: str | None) -> bool:
    return prediction is None or not prediction.strip()


_PREFIX_RE = re.compile(
    r"^(?:" + "|".join(re.escape(p) for p in ANSWER_PREFIXES) + r")(?=$|[\s:])[\s:]*",
    re.IGNORECASE)


def _strip_prefix(s: str) -> str:
    return _PREFIX_RE.sub("", s, count=1)


_TRAILING_PUNCT = ".,;:!?\u3002"
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019",
                "\u00ab": "\u00bb"}


def normalize_text(text: str) -> str:
    """The ``exact`` scorer's normalisation (see the module docstring)."""
    s = text
    for _ in range(4):  # NFKC(casefold(.)) can change once more; stop when stable
        t = unicodedata.normalize("NFKC", s).casefold()
        if t == s:
            break
        s = t
    s = " ".join(s.split())
    while True:
        prev = s
        s = _strip_prefix(s).strip()
        s = s.rstrip(_TRAILING_PUNCT + " ")
        if len(s) >= 2 and _QUOTE_PAIRS.get(s[0]) == s[-1]:
            s = s[1:-1].strip()
        if s == prev:
            return s


def _last_braced(s: str, command: str) -> str | None:
    """Content of the last ``\\command{...}`` (balanced braces), or None."""
    start = s.rfind("\\" + command + "{")
    if start < 0:
        return None
    i = start + len(command) + 2
    depth = 1
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[i:j]
    return None


_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))


def _unwrap(s: str) -> str:
    """Take the last \\boxed{...}/\\fbox{...}, then strip surrounding $...$, \\(...\\), **...**."""
    s = s.strip()
    for cmd in ("boxed", "fbox"):
        inner = _last_braced(s, cmd)
        if inner is not None:
            s = inner.strip()
            break
    changed = True
    while changed:
        changed = False
        for left, right in _DELIMS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):len(s) - len(right)].strip()
                changed = True
    return s


_SUPERSCRIPTS = str.maketrans({c: "^" + d for c, d in zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")})


def _prepare(s: str) -> str:
    """Shared by numeric and math: superscripts, NFKC, Unicode minus/fraction slash, unwrap."""
    s = unicodedata.normalize("NFKC", s.translate(_SUPERSCRIPTS))
    s = s.replace("\u2212", "-").replace("\u2044", "/").replace("\u2215", "/")
    s = s.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    return _unwrap(s)


# --------------------------------------------------------------------------- exact

def exact(prediction: str | None, answer: str, *, choices: Sequence[str] | None = None) -> float:
    """1.0 iff both sides are equal and non-empty after ``normalize_text``."""
    _check_args(prediction, answer)
    if _blank(prediction):
        return 0.0
    p, a = normalize_text(prediction), normalize_text(answer)
    return 1.0 if p and p == a else 0.0


# --------------------------------------------------------------------------- numeric

_NUMBER_RE = re.compile(r"""
    (?P<sign1>[+-]?) (?P<cur>[$€£¥]?) (?P<sign2>[+-]?)
    (?:
        (?P<num>[0-9]+)/(?P<den>[0-9]+)
      | (?P<mant>(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)
        (?:[eE](?P<exp>[+-]?[0-9]+))?
    )
    %?
""", re.VERBOSE)

_LEAD_STRIP = "([{\"'*_`\u201c\u2018"
_TRAIL_STRIP = ".,;:?)]}\"'*_`\u201d\u2019"
_TOKEN_SPLIT = re.compile(r"[\s=]+")
# Enough digits that two distinct integers/decimals written out in a prediction still compare
# as distinct; the exponent range is the full decimal range so "1e999999" does not overflow.
_DEC = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN,
               traps=[InvalidOperation, _DecDivisionByZero, _DecOverflow])


def _parse_number(token: str) -> Decimal | None:
    m = _NUMBER_RE.fullmatch(token)
    if m is None or (m["sign1"] and m["sign2"]):
        return None
    negative = (m["sign1"] or m["sign2"]) == "-"
    try:
        if m["num"] is not None:
            value = _DEC.divide(Decimal(m["num"]), Decimal(m["den"]))
        else:
            text = m["mant"].replace(",", "") + (f"e{m['exp']}" if m["exp"] is not None else "")
            value = Decimal(text)  # exact: integers longer than the context precision stay exact
        return -value if negative else value
    except (ArithmeticError, ValueError):
        return None


def _single_number(text: str) -> Decimal | None:
    """The one number in ``text`` (see the module docstring), or None."""
    found: Decimal | None = None
    for raw in _TOKEN_SPLIT.split(_prepare(text)):
        tok = raw.lstrip(_LEAD_STRIP).rstrip(_TRAIL_STRIP)
        if not tok:
            continue
        if not any(ch.isdigit() for ch in tok):
            continue  # a word: ignored
        value = _parse_number(tok)
        if value is None or found is not None:
            return None  # a digit that is not a number, or a second number
        found = value
    return found


def _numbers_close(a: Decimal, b: Decimal, rel_tol: float, abs_tol: float) -> bool:
    try:
        if a == b:
            return True
        if a == a.to_integral_value(context=_DEC) and b == b.to_integral_value(context=_DEC):
            return False  # integers compare exactly
        diff = _DEC.abs(_DEC.subtract(a, b))
        scale = max(_DEC.abs(a), _DEC.abs(b))
        tol = max(_DEC.multiply(Decimal(repr(float(rel_tol))), scale), Decimal(repr(float(abs_tol))))
        return diff <= tol
    except ArithmeticError:
        return False


def _check_tols(rel_tol: float, abs_tol: float) -> None:
    if not (rel_tol >= 0 and abs_tol >= 0 and _pymath.isfinite(rel_tol) and _pymath.isfinite(abs_tol)):
        raise ValueError(f"rel_tol and abs_tol must be finite and >= 0, got {rel_tol!r}, {abs_tol!r}")


def numeric(prediction: str | None, answer: str, *, rel_tol: float = DEFAULT_REL_TOL,
            abs_tol: float = DEFAULT_ABS_TOL, choices: Sequence[str] | None = None) -> float:
    """1.0 iff each side holds exactly one number and they are equal (see the module docstring)."""
    _check_args(prediction, answer)
    _check_tols(rel_tol, abs_tol)
    if _blank(prediction):
        return 0.0
    a = _single_number(answer)
    if a is None:
        return 0.0
    p = _single_number(prediction)  # type: ignore[arg-type]  # not None: checked by _blank
    return 1.0 if p is not None and _numbers_close(p, a, rel_tol, abs_tol) else 0.0


# --------------------------------------------------------------------------- choice

_LETTER_ONLY = re.compile(r"(?:option|choice)?\s*[(\[]?\s*([a-z])\s*[)\]]?\s*[.:)]?", re.IGNORECASE)
_LETTER_TEXT = re.compile(r"(?:option|choice)?\s*[(\[]?\s*([a-z])\s*(?:[)\]]\s*[.:]?|[.:])\s+(\S.*)",
                          re.IGNORECASE | re.DOTALL)


def _read_choice(text: str, choices: Sequence[str] | None) -> int | None:
    """Index (0 = A) the text picks, or None when it picks none or is ambiguous."""
    s = unicodedata.normalize("NFKC", text)
    s = " ".join(s.split())
    s = _strip_prefix(_unwrap(s)).strip().rstrip(".").strip()
    s = _unwrap(s)  # "Answer: **B**"
    n = len(choices) if choices is not None else 26
    normalized_choices = [normalize_text(c) for c in choices] if choices is not None else []

    def by_text(t: str) -> int | None:
        key = normalize_text(t)
        hits = [i for i, c in enumerate(normalized_choices) if key and c == key]
        return hits[0] if len(hits) == 1 else None

    index: int | None
    if m := _LETTER_ONLY.fullmatch(s):
        index = ord(m[1].lower()) - ord("a")
    elif m := _LETTER_TEXT.fullmatch(s):
        index = ord(m[1].lower()) - ord("a")
        other = by_text(m[2]) if choices is not None else None
        if other is not None and other != index:
            return None  # "B) <text of option A>" contradicts itself
    elif choices is not None:
        index = by_text(s)
    else:
        index = None
    return index if index is not None and index < n else None


def choice(prediction: str | None, answer: str, *, choices: Sequence[str] | None = None) -> float:
    """1.0 iff the prediction picks the same option as the gold answer (see the module docstring)."""
    _check_args(prediction, answer)
    if choices is not None and (isinstance(choices, str) or not all(isinstance(c, str) for c in choices)):
        raise TypeError("choices must be a sequence of option texts (str), in letter order")
    if _blank(prediction):
        return 0.0
    gold = _read_choice(answer, choices)
    if gold is None:
        return 0.0
    return 1.0 if _read_choice(prediction, choices) == gold else 0.0  # type: ignore[arg-type]


# --------------------------------------------------------------------------- math

class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
    """Raise _Timeout in the block after ``seconds``; yields False when no limit can be set.

    SIGALRM works only on the main thread of a POSIX process. An outer ITIMER_REAL (for
    example pytest-timeout's) is honoured: ours never outlasts it, and it is re-armed after.
    """
    if (not hasattr(signal, "setitimer") or seconds <= 0
            or threading.current_thread() is not threading.main_thread()):
        yield False
        return
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)

    def on_alarm(signum: int, frame: object) -> None:
        raise _Timeout()

    try:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # not the main interpreter
        yield False
        return
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, old_delay) if old_delay else seconds)
    try:
        yield True
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:
                left = old_delay - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), old_interval)


@functools.cache
def _sympy() -> Any:
    # Imported on first use: sympy takes ~0.5 s to import and most runs never need it.
    import sympy
    from sympy.parsing import sympy_parser as sp

    transformations = sp.standard_transformations + (sp.implicit_multiplication,)
    allowed = {n: getattr(sympy, n) for n in (
        "Integer", "Float", "Rational", "Symbol", "Function", "Add", "Mul", "Pow", "sqrt", "pi", "oo")}
    return sympy, sp.parse_expr, transformations, allowed


_GREEK = ("alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
          "vartheta", "iota", "kappa", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon",
          "phi", "varphi", "chi", "psi", "omega")
_SIMPLE_CMDS = {"cdot": "*", "times": "*", "div": "/", "pi": " pi ", "infty": " oo ",
                "lambda": " lamda ", **{g: f" {g} " for g in _GREEK}}
_DROP_CMDS = {"left", "right", "displaystyle", "!", ",", ";", ":", " ", "quad", "qquad",
              "big", "Big", "bigl", "bigr", "Bigl", "Bigr"}
_UNWRAP_CMDS = {"mathrm", "mathbf", "textbf", "mathit", "boldsymbol"}
_DROP_GROUP_CMDS = {"text", "textrm", "mbox"}
_CMD_RE = re.compile(r"\\([A-Za-z]+|.)", re.DOTALL)


def _group(s: str, i: int) -> tuple[str | None, int]:
    """One TeX argument at s[i:]: a {...} group, a \\command, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1:j], j + 1
        return None, len(s)
    if s[i] == "\\":
        m = _CMD_RE.match(s, i)
        return (m[0], m.end()) if m is not None else (None, len(s))
    return s[i], i + 1


def _latex_to_plain(s: str) -> str | None:
    """Translate LaTeX-light into parse_expr syntax, or None for anything unsupported."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = _CMD_RE.match(s, i)
            if m is None:
                return None  # a trailing backslash
            name, i = m[1], m.end()
            if name in ("frac", "dfrac", "tfrac"):
                num, i = _group(s, i)
                den, i = _group(s, i)
                a = _latex_to_plain(num) if num is not None else None
                b = _latex_to_plain(den) if den is not None else None
                if a is None or b is None:
                    return None
                out.append(f"(({a})/({b}))")
            elif name == "sqrt":
                index = None
                if s.startswith("[", i):
                    close = s.find("]", i)
                    if close < 0:
                        return None
                    index = _latex_to_plain(s[i + 1:close])
                    if index is None:
                        return None
                    i = close + 1
                arg, i = _group(s, i)
                a = _latex_to_plain(arg) if arg is not None else None
                if a is None:
                    return None
                out.append(f"sqrt({a})" if index is None else f"(({a})**(1/({index})))")
            elif name in _DROP_CMDS:
                pass
            elif name in _DROP_GROUP_CMDS:
                _, i = _group(s, i)
            elif name in _UNWRAP_CMDS:
                arg, i = _group(s, i)
                a = _latex_to_plain(arg) if arg is not None else None
                if a is None:
                    return None
                out.append(f"({a})")
            elif name in _SIMPLE_CMDS:
                out.append(_SIMPLE_CMDS[name])
            else:
                return None
        elif c == "{":
            out.append("(")
            i += 1
        elif c == "}":
            out.append(")")
            i += 1
        elif c == "^":
            out.append("**")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_ASSIGN_LHS = re.compile(r"\s*[A-Za-z][A-Za-z0-9]*\s*")
_THOUSANDS = re.compile(r"(?<![0-9.,])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9,])")
_PLAIN_OK = re.compile(r"[0-9A-Za-z+\-*/(). ]*")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_LEADING_ZEROS = re.compile(r"(?<![0-9.A-Za-z_])0+(?=[0-9])")
_SCI_EXP = re.compile(r"(?<![A-Za-z0-9_])(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?([0-9]+)")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")


def _math_text(text: str) -> str:
    """Prepared text: unwrapped, prefix and trailing '.' stripped, "x = RHS" -> RHS."""
    s = " ".join(_prepare(text).split())
    s = _unwrap(_strip_prefix(s).strip().rstrip(".").strip())
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if _ASSIGN_LHS.fullmatch(lhs) and rhs.strip():
            s = rhs.strip()
    return s


def _to_plain(text: str) -> str | None:
    s = _math_text(text)
    if not s or len(s) > MATH_MAX_CHARS:
        return None
    if whole := re.fullmatch(r"\\text\{([^{}]*)\}", s):
        s = whole[1]  # a text-only answer ("\\text{Monday}") is its text, not a dropped unit
    s = _DEGREE.sub("", s).replace("%", "").replace("$", "")
    s = _THOUSANDS.sub(lambda m: m[0].replace(",", ""), s)
    plain = _latex_to_plain(s)
    if plain is None or not plain.strip():
        return None
    plain = " ".join(plain.split())
    if not _PLAIN_OK.fullmatch(plain) or re.search(r"[0-9.] +[0-9.]", plain) or "//" in plain:
        return None  # "2 3" would silently become 6; "//" is Python's floor division
    if re.search(r"\(\s*\)", plain):
        return None  # "()" is a Python tuple, not an expression
    plain = _LEADING_ZEROS.sub("", plain)  # Python rejects "05"; a prediction may say it
    if re.search(r"\.(?![0-9])", plain):
        return None  # a '.' not followed by a digit could be attribute access
    for m in _SCI_EXP.finditer(plain):
        if len(m[1]) > 6 or int(m[1]) > MATH_MAX_DIGITS:
            return None  # sympy's Float("1e999999999") builds a billion-digit integer
    return plain


def _size(expr: Any, sympy: Any) -> float:
    """Estimated decimal digits of ``expr`` once evaluated (symbols count 1). Raises on too big."""
    if expr.is_Integer:
        size = max(1.0, abs(int(expr.p)).bit_length() * 0.30103)
    elif expr.is_Rational:
        size = max(1.0, (abs(int(expr.p)).bit_length() + int(expr.q).bit_length()) * 0.30103)
    elif expr.is_Float:
        _, _, exp, bc = expr._mpf_  # binary exponent and mantissa bit count
        size = max(1.0, abs(exp + bc) * 0.30103)
    elif expr.is_Pow:
        base, exp = expr.args
        base_size, exp_size = _size(base, sympy), _size(exp, sympy)
        if exp.free_symbols:
            factor = exp_size
        else:
            value = exp.evalf(15)  # safe: exp itself passed the size check just above
            if not value.is_number or not value.is_finite:
                raise OverflowError("non-finite exponent")
            factor = max(1.0, float(abs(value)))
        size = base_size * factor
    elif expr.is_Mul:
        size = sum(_size(a, sympy) for a in expr.args)
    elif expr.args:
        size = max(_size(a, sympy) for a in expr.args) + 1
    else:
        size = 1.0
    if not size <= MATH_MAX_DIGITS:
        raise OverflowError("expression too large")
    return size


def _parse_math(text: str) -> Any | None:
    """A sympy expression for ``text``, or None when it is not (safely) parseable."""
    try:
        return _parse_math_unguarded(text)
    except Exception:  # noqa: BLE001 - any failure on any text means "unparseable", never a crash
        return None


def _parse_math_unguarded(text: str) -> Any | None:
    plain = _to_plain(text)
    if plain is None:
        return None
    names = set(_NAME.findall(plain))
    sympy, parse_expr, transformations, allowed = _sympy()
    if any(keyword.iskeyword(n) or keyword.issoftkeyword(n) or n in ("None", "True", "False")
           or (n in allowed and n not in ("sqrt", "pi", "oo")) for n in names):
        return None
    # Every other name is a plain Symbol, so "x(y+1)" is a product and no sympy function
    # (integrate, factorial, ...) can be reached from the text.
    local = {n: sympy.Symbol(n) for n in names if n not in allowed}

    def parse(evaluate: bool) -> Any:
        glob = dict(allowed)
        glob["__builtins__"] = {}
        return parse_expr(plain, local_dict=dict(local), global_dict=glob,
                          transformations=transformations, evaluate=evaluate)

    try:
        _size(parse(False), sympy)  # unevaluated first: 10**10**10 must never be computed
        expr = parse(True)
    except Exception:  # noqa: BLE001 - any parser/sympy failure means "unparseable"
        return None
    return expr if isinstance(expr, sympy.Expr) else None


def _values_close(va: Any, vb: Any, rel_tol: float, abs_tol: float) -> bool | None:
    """Compare two evaluated numbers; None when either is not a finite number."""
    if not (va.is_number and vb.is_number and va.is_finite and vb.is_finite):
        return None
    diff = abs(va - vb).evalf(30)
    scale = max(abs(va).evalf(30), abs(vb).evalf(30))
    if not (diff.is_Number and scale.is_Number):
        return None
    return bool(diff <= max(rel_tol * scale, abs_tol))


def _math_equal(a: Any, b: Any, rel_tol: float, abs_tol: float, timeout_s: float) -> bool:
    sympy = _sympy()[0]
    if a == b:
        return True
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        if a.is_Rational and b.is_Rational:
            return False  # exact values, already compared structurally
        return bool(_values_close(a.evalf(30), b.evalf(30), rel_tol, abs_tol))
    # Polynomial identity test at fixed points: a fresh Random(0) makes every call see the
    # same points, so a score never changes between runs.
    rng = random.Random(0)
    agreed = 0
    for _ in range(6):
        subs = {s: sympy.Float(rng.choice((-1, 1)) * rng.uniform(0.3, 1.7), 30) for s in symbols}
        verdict = _values_close(a.evalf(30, subs=subs), b.evalf(30, subs=subs), rel_tol, abs_tol)
        if verdict is False:
            return False
        agreed += verdict is True
    if agreed >= 3:
        return True
    with _time_limit(timeout_s) as limited:
        if not limited:
            return False  # simplify could hang and nothing could stop it here
        return bool(sympy.simplify(a - b) == 0)


def math(prediction: str | None, answer: str, *, rel_tol: float = DEFAULT_REL_TOL,
         abs_tol: float = DEFAULT_ABS_TOL, timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
         choices: Sequence[str] | None = None) -> float:
    """1.0 iff the prediction is mathematically equal to the gold (see the module docstring)."""
    _check_args(prediction, answer)
    _check_tols(rel_tol, abs_tol)
    if _blank(prediction):
        return 0.0
    pred_text: str = prediction  # type: ignore[assignment]  # not None: checked by _blank
    gold = _parse_math(answer)
    if gold is not None:
        pred = _parse_math(pred_text)
        if pred is None:
            return 0.0
        try:
            return 1.0 if _math_equal(pred, gold, rel_tol, abs_tol, timeout_s) else 0.0
        except Exception:  # noqa: BLE001 - _Timeout, sympy errors, recursion: never crash a reward
            return 0.0
    if _single_number(answer) is not None:
        return numeric(pred_text, answer, rel_tol=rel_tol, abs_tol=abs_tol)

    def shown(t: str) -> str:
        return re.sub(r"\\text\{([^{}]*)\}", r"\1", _math_text(t))

    return exact(shown(pred_text), shown(answer))


# --------------------------------------------------------------------------- registry

SCORERS: dict[str, Scorer] = {"exact": exact, "numeric": numeric, "choice": choice, "math": math}


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; ConfigError naming the valid ones otherwise."""
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(SCORERS))
        raise ConfigError(f"unknown scorer {name!r}.", field="scorer",
                          fix=f"set the benchmark's scorer to one of: {valid}.") from None


def score_answer(prediction: str | None, answer: str, scorer: str | Scorer,
                 choices: Sequence[str] | None = None, **options: Any) -> float:
    """Score one prediction with the scorer named ``scorer`` (or a scorer function).

    ``options`` go to the scorer (``rel_tol``, ``abs_tol``, ``timeout_s``); an option the
    scorer does not take raises TypeError rather than being silently ignored.
    """
    fn = scorer if callable(scorer) else get_scorer(scorer)
    return fn(prediction, answer, choices=choices, **options)


# --------------------------------------------------------------------------- format, cost, total

def format_reward(n_invalid_turns: int, answered: bool, penalty: float = 1.0) -> float:
    """0.0 when every turn was a valid action and the episode ended with an answer, else -penalty.

    One penalty per episode, not per invalid turn, as in the paper (format reward 0 or -1):
    the signal says "follow the protocol" without outweighing the outcome.
    """
    if n_invalid_turns < 0:
        raise ValueError(f"n_invalid_turns must be >= 0, got {n_invalid_turns}")
    if not (penalty >= 0 and _pymath.isfinite(penalty)):
        raise ValueError(f"penalty must be finite and >= 0 (it is subtracted), got {penalty!r}")
    if n_invalid_turns == 0 and answered:
        return 0.0
    return -float(penalty)


def cost_reward(cost: float, cost_lambda: float, cost_scale: float) -> float:
    """``-cost_lambda * cost / cost_scale``: the episode's cost in units of ``cost_scale``.

    Normalising by cost_scale keeps cost_lambda comparable across price lists: with
    cost_scale=1e-3, a 0.002-currency episode at cost_lambda=0.1 costs 0.2 reward.
    """
    if not (cost_scale > 0 and _pymath.isfinite(cost_scale)):
        raise ValueError(f"cost_scale must be finite and > 0, got {cost_scale!r}; set it to the "
                         "cost (in currency units) that should count as 1.0, e.g. 1e-3")
    if not (cost_lambda >= 0 and _pymath.isfinite(cost_lambda)):
        raise ValueError(f"cost_lambda must be finite and >= 0, got {cost_lambda!r}; use 0.0 "
                         "to ignore cost")
    if not (cost >= 0 and _pymath.isfinite(cost)):
        raise ValueError(f"cost must be finite and >= 0, got {cost!r}")
    term = -cost_lambda * cost / cost_scale
    return term if term != 0 else 0.0  # no "-0.0" in logs and tables


def total_reward(outcome: float, format_score: float, cost_term: float) -> float:
    """The scalar GRPO sees: the plain sum of the three terms."""
    return outcome + format_score + cost_term


def _nonneg(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and _pymath.isfinite(value) and value >= 0)


@dataclass(frozen=True)
class RewardConfig:
    """The reward's knobs (frozen: one run, one reward definition)."""

    format_penalty: float = field(default=1.0, metadata={
        "help": "Subtracted once when an episode had an invalid turn or ended without an answer "
                "(the paper's format reward is 0 or -1). Must be >= 0."})
    cost_lambda: float = field(default=0.0, metadata={
        "help": "Weight of the cost term: reward -= cost_lambda * cost / cost_scale. "
                "0.0 ignores cost. Must be >= 0."})
    cost_scale: float = field(default=1e-3, metadata={
        "help": "The episode cost (currency units) that counts as 1.0 in the cost term. Must be > 0."})
    cost_on_success: bool = field(default=False, metadata={
        "help": "Charge the cost term only when the answer is right (cost_term x outcome): every wrong "
                "answer scores the same whatever it cost, so the cost breaks ties between right routes and "
                "never makes a cheap failure look better than a dear one. False: the paper's reward."})

    def __post_init__(self) -> None:
        src = "RewardConfig"
        if not _nonneg(self.format_penalty):
            raise ConfigError(f"format_penalty must be a finite number >= 0, got {self.format_penalty!r}.",
                              source=src, field="format_penalty",
                              fix="use 1.0 (the paper's -1 format reward) or 0.0 to disable it.")
        if not _nonneg(self.cost_lambda):
            raise ConfigError(f"cost_lambda must be a finite number >= 0, got {self.cost_lambda!r}.",
                              source=src, field="cost_lambda",
                              fix="use 0.0 to ignore cost, or a small positive weight such as 0.1.")
        if not (_nonneg(self.cost_scale) and self.cost_scale > 0):
            raise ConfigError(f"cost_scale must be a finite number > 0, got {self.cost_scale!r}.",
                              source=src, field="cost_scale",
                              fix="set it to the cost in currency units that should count as 1.0, e.g. 1e-3.")


@dataclass(frozen=True)
class RewardBreakdown:
    """One episode's reward and its parts (Trajectory stores all four)."""

    outcome: float
    format_score: float
    cost_term: float
    total: float


def compute_reward(prediction: str | None, answer: str, scorer: str | Scorer, *,
                   n_invalid_turns: int, answered: bool, cost: float, config: RewardConfig,
                   choices: Sequence[str] | None = None) -> RewardBreakdown:
    """Score an episode: outcome (0 when it did not answer) + format + cost terms."""
    fn = scorer if callable(scorer) else get_scorer(scorer)  # a bad name fails even unanswered
    outcome = fn(prediction, answer, choices=choices) if answered else 0.0
    fmt = format_reward(n_invalid_turns, answered, config.format_penalty)
    cost_term = cost_reward(cost, config.cost_lambda, config.cost_scale)
    if config.cost_on_success:
        cost_term = cost_term if outcome > 0 else 0.0
    return RewardBreakdown(outcome=outcome, format_score=fmt, cost_term=cost_term,
                           total=total_reward(outcome, fmt, cost_term))
