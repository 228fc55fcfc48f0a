"""Tests for maestro_core.rewards: scorer tables (with the substring traps), properties, and
the format/cost/total terms."""

from __future__ import annotations

import dataclasses
import math as pymath
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from maestro_core import rewards
from maestro_core.errors import ConfigError
from maestro_core.rewards import (
    SCORERS, RewardBreakdown, RewardConfig, choice, compute_reward, cost_reward, exact,
    format_reward, get_scorer, normalize_text, numeric, score_answer, total_reward,
)
from maestro_core.rewards import math as math_scorer

# --------------------------------------------------------------------------- exact

EXACT_CASES = [
    ("Paris", "paris", 1.0),
    ("  Paris.  ", "Paris", 1.0),
    ("The answer is Paris", "Paris", 1.0),
    ("Answer: Paris", "paris", 1.0),
    ("final answer: New   York", "new york", 1.0),
    ('"Paris"', "Paris", 1.0),
    ("“Paris”!", "paris", 1.0),
    ("ＰＡＲＩＳ", "paris", 1.0),          # NFKC folds full-width letters
    ("Straße", "STRASSE", 1.0),           # casefold, not lower()
    ("5", "15", 0.0),                     # no substring matching, either way
    ("15", "5", 0.0),
    ("5 and 15", "5", 0.0),
    ("Paris, France", "Paris", 0.0),
    ("the Paris", "Paris", 0.0),          # articles are not stripped
    ("answers: Paris", "Paris", 0.0),     # only the fixed prefixes
    (None, "Paris", 0.0),
    ("", "Paris", 0.0),
    ("   ", "", 0.0),
    ("...", "...", 0.0),                  # empty after normalisation never matches
]


@pytest.mark.parametrize("pred,gold,expected", EXACT_CASES)
def test_exact(pred: str | None, gold: str, expected: float) -> None:
    assert exact(pred, gold) == expected


# --------------------------------------------------------------------------- numeric

NUMERIC_CASES = [
    ("5", "5", 1.0),
    ("5", "15", 0.0),
    ("15", "5", 0.0),
    ("5 and 15", "5", 0.0),               # two numbers: unreadable
    ("15 or 5", "5", 0.0),
    ("1,000", "1000", 1.0),
    ("1,234,567.50", "1234567.5", 1.0),
    ("1,00", "100", 0.0),                 # not a thousands group
    ("0.5", "1/2", 1.0),
    ("3/4", "0.75", 1.0),
    ("$5", "5", 1.0),
    ("-$5", "-5", 1.0),
    ("5%", "5", 1.0),                     # '%' is a unit, dropped
    ("5%", "0.05", 0.0),
    ("1.50", "1.5", 1.0),
    ("1.5e3", "1500", 1.0),
    ("-7", "7", 0.0),
    ("−7", "-7", 1.0),                    # Unicode minus
    ("about 5 apples", "5", 1.0),         # words are ignored
    ("x = 5", "5", 1.0),
    ("5-10", "5", 0.0),                   # digits that are not a number: unreadable
    ("2x", "2", 0.0),
    ("5²", "52", 0.0),                    # a superscript is not a digit
    ("\\boxed{42}", "42", 1.0),
    ("0.30000000000000004", "0.3", 1.0),  # float noise is within rel_tol
    ("0.333", "1/3", 0.0),
    ("1000001", "1000000", 0.0),          # integers compare exactly
    ("five", "5", 0.0),
    (None, "5", 0.0),
    ("", "5", 0.0),
]


@pytest.mark.parametrize("pred,gold,expected", NUMERIC_CASES)
def test_numeric(pred: str | None, gold: str, expected: float) -> None:
    assert numeric(pred, gold) == expected


def test_numeric_rel_tol_option() -> None:
    assert numeric("0.333", "1/3") == 0.0
    assert numeric("0.333", "1/3", rel_tol=1e-2) == 1.0
    assert score_answer("0.333", "1/3", "numeric", rel_tol=1e-2) == 1.0
    with pytest.raises(ValueError):
        numeric("1", "1", rel_tol=-1.0)


# --------------------------------------------------------------------------- choice

CITIES = ["London", "Paris", "Rome", "Berlin"]

CHOICE_CASES = [
    ("B", "B", None, 1.0),
    ("(b)", "B", None, 1.0),
    ("B", "(b)", None, 1.0),
    ("B.", "B", None, 1.0),
    ("b) some text", "B", None, 1.0),
    ("(B) Paris", "B", None, 1.0),
    ("Answer: B", "B", None, 1.0),
    ("The answer is (B).", "B", None, 1.0),
    ("Option B", "B", None, 1.0),
    ("\\boxed{B}", "B", None, 1.0),
    ("**B**", "B", None, 1.0),
    ("A or B", "A", None, 0.0),           # two letters: unreadable
    ("A, B", "A", None, 0.0),
    ("I think B", "B", None, 0.0),        # letters inside prose are not read
    ("C", "B", None, 0.0),
    ("Paris", "B", CITIES, 1.0),          # the full text of the right option
    ("paris.", "B", CITIES, 1.0),
    ("Paris", "A", CITIES, 0.0),
    ("B) London", "B", CITIES, 0.0),      # letter and text disagree
    ("B) Paris", "B", CITIES, 1.0),
    ("E", "E", CITIES, 0.0),              # past the last option
    ("Paris", "Paris", CITIES, 1.0),      # gold given as option text
    ("Pari", "B", CITIES, 0.0),
    (None, "B", None, 0.0),
]


@pytest.mark.parametrize("pred,gold,choices,expected", CHOICE_CASES)
def test_choice(pred: str | None, gold: str, choices: list[str] | None, expected: float) -> None:
    assert choice(pred, gold, choices=choices) == expected


def test_choice_numeric_option_texts_do_not_match_substrings() -> None:
    opts = ["5", "15", "25", "5 and 15"]
    assert choice("5", "A", choices=opts) == 1.0
    assert choice("15", "A", choices=opts) == 0.0
    assert choice("5", "B", choices=opts) == 0.0
    assert choice("5 and 15", "A", choices=opts) == 0.0


# --------------------------------------------------------------------------- math

MATH_CASES = [
    ("x+1", "1+x", 1.0),
    ("1+2x", "2*x+1", 1.0),
    ("2(x+1)", "2x+2", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac12", "1/2", 1.0),
    ("\\dfrac{x^2-1}{x-1}", "x+1", 1.0),
    ("\\boxed{3}", "3", 1.0),
    ("$\\boxed{3}$", "3", 1.0),
    ("The answer is $\\frac{\\sqrt{2}}{2}$.", "1/sqrt(2)", 1.0),
    ("\\sqrt{4}", "2", 1.0),
    ("\\sqrt[3]{8}", "2", 1.0),
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("\\pi r^2", "r^{2} \\cdot \\pi", 1.0),
    ("x = 5", "5", 1.0),
    ("1,000", "1000", 1.0),
    ("90^\\circ", "90", 1.0),
    ("1.414214", "\\sqrt{2}", 1.0),       # constants compare within rel_tol
    ("5", "15", 0.0),
    ("15", "5", 0.0),
    ("5 and 15", "5", 0.0),
    ("5 apples", "5", 0.0),               # math is strict about extra words
    ("x^2", "2", 0.0),
    ("x", "-x", 0.0),
    ("\\sqrt{x^2}", "x", 0.0),            # not an identity for negative x
    ("x^{1999}", "x^{1999}+1", 0.0),
    ("0.333", "\\frac{1}{3}", 0.0),
    ("5!", "5", 0.0),
    ("10^{10^{10}}", "1", 0.0),           # refused, never computed
    ("\\text{Monday}", "Monday", 1.0),    # text-only answers
    ("(1,2)", "(1,2)", 1.0),              # gold not math: falls back to exact
    ("(1, 3)", "(1,2)", 0.0),
    ("\\$5", "5", 1.0),                   # gold is math, "$" is dropped
    (None, "3", 0.0),
    ("", "3", 0.0),
]


@pytest.mark.parametrize("pred,gold,expected", MATH_CASES)
def test_math(pred: str | None, gold: str, expected: float) -> None:
    assert math_scorer(pred, gold) == expected


def test_math_falls_back_to_numeric_for_a_numeric_gold_math_cannot_parse() -> None:
    # An exponent this large is refused before sympy sees it, so numeric decides.
    assert math_scorer("1e99999999999", "1e99999999999") == 1.0
    assert math_scorer("2e99999999999", "1e99999999999") == 0.0


def test_math_undecided_symbolic_pair_scores_zero_without_a_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    import sympy

    x = sympy.Symbol("x")
    a, b = sympy.oo * x, sympy.oo * x**2  # infinite at every sample point: the points cannot decide
    assert rewards._math_equal(a, b, 1e-6, 1e-9, 2.0) is False

    calls: list[float] = []

    @contextlib.contextmanager
    def no_limit(seconds: float):
        calls.append(seconds)
        yield False

    monkeypatch.setattr(rewards, "_time_limit", no_limit)
    monkeypatch.setattr(sympy, "simplify", lambda e: pytest.fail("simplify ran without a time limit"))
    assert rewards._math_equal(a, b, 1e-6, 1e-9, 2.0) is False
    assert calls == [2.0]


def test_time_limit_interrupts_and_restores_an_outer_timer() -> None:
    if not hasattr(signal, "setitimer"):
        pytest.skip("no setitimer on this platform")
    fired: list[int] = []
    outer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, if it uses signals
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        start = time.monotonic()
        with pytest.raises(rewards._Timeout):
            with rewards._time_limit(0.05) as limited:
                assert limited
                while time.monotonic() - start < 5:
                    pass
        assert time.monotonic() - start < 2
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left <= 30  # the outer timer is re-armed, minus the time spent
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer[0]:
            signal.setitimer(signal.ITIMER_REAL, *outer)


def test_time_limit_is_off_outside_the_main_thread() -> None:
    seen: list[bool] = []

    def worker() -> None:
        with rewards._time_limit(1.0) as limited:
            seen.append(limited)
        seen.append(math_scorer("x+1", "1+x") == 1.0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [False, True]


# --------------------------------------------------------------------------- registry

def test_get_scorer_and_score_answer() -> None:
    assert set(SCORERS) == {"exact", "numeric", "choice", "math"}
    assert get_scorer("numeric") is numeric
    assert score_answer("(b)", "B", "choice") == 1.0
    assert score_answer("Paris", "B", "choice", choices=CITIES) == 1.0
    assert score_answer("x", "x", lambda p, a, **kw: 1.0) == 1.0
    for name in ("exact", "numeric", "choice", "math"):
        assert score_answer("5", "5", name, choices=["5", "6"]) in (0.0, 1.0)


@pytest.mark.parametrize("name", ["Exact", "regex", "", "f1"])
def test_get_scorer_unknown_names_the_valid_ones(name: str) -> None:
    with pytest.raises(ConfigError) as e:
        get_scorer(name)
    msg = str(e.value)
    assert repr(name) in msg and "choice, exact, math, numeric" in msg and "Fix:" in msg


def test_scorers_reject_non_str_arguments() -> None:
    for fn in SCORERS.values():
        with pytest.raises(TypeError):
            fn("5", 5)
        with pytest.raises(TypeError):
            fn(5, "5")
    with pytest.raises(TypeError):
        score_answer("5", "5", "exact", rel_tol=0.1)  # an option the scorer does not take


# --------------------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_exact_matches_itself_when_normalisation_leaves_text(s: str) -> None:
    norm = normalize_text(s)
    assert normalize_text(norm) == norm  # idempotent
    assert exact(s, s) == (1.0 if norm else 0.0)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(lambda s: normalize_text(s) != ""))
def test_exact_self_match_for_non_empty(s: str) -> None:
    assert exact(s, s) == 1.0


_finite = st.floats(allow_nan=False, allow_infinity=False)
_ints = st.integers(min_value=-10**40, max_value=10**40)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_finite, _ints))
def test_numeric_self_match(n: float | int) -> None:
    assert numeric(str(n), str(n)) == 1.0
    assert numeric(f"{n}", f" {n}. ") == 1.0


@settings(max_examples=300, deadline=None)
@given(st.one_of(_finite, _ints), st.one_of(_finite, _ints))
def test_numeric_distinct_values_do_not_match(a: float | int, b: float | int) -> None:
    fa, fb = float(a), float(b)
    # Margin of 2x the tolerance: str() of a float is its shortest repr, not its exact value.
    tol = max(rewards.DEFAULT_REL_TOL * max(abs(fa), abs(fb)), rewards.DEFAULT_ABS_TOL)
    assume(abs(fa - fb) > 2 * tol)
    assert numeric(str(a), str(b)) == 0.0
    assert numeric(str(b), str(a)) == 0.0


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=10**12))
def test_numeric_never_matches_a_different_integer(a: int, b: int) -> None:
    assume(a != b)
    assert numeric(str(a), str(b)) == 0.0
    assert numeric(f"{a:,}", f"{b:,}") == 0.0
    assert numeric(f"{a} and {b}", str(a)) == 0.0
    assert math_scorer(str(a), str(b)) == 0.0


_weird = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.,+-*/^()[]{}$%eE =\\ xyabfrcsqt!_", max_size=80),
    st.sampled_from([
        "\\frac{", "\\sqrt[", "\\boxed{\\boxed{", "9^{9^{9^{9}}}", "1e999999999", "(" * 300,
        "x" * 5000, "1" * 20000, "\\" * 50, "lambda: 0", "__import__('os')", "().__class__",
        "1//0", "0^{-1}", "\x00\ud7ff\U0010ffff", "½⁄", "⁹⁹⁹", "$$", "**", "A) B) C)",
        "1,000,000,000e-1000000000000", "\\frac{1}{0}", "oo - oo", "nan", "inf",
    ]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_weird, _weird)
def test_scorers_never_raise_and_return_0_or_1(pred: str, gold: str) -> None:
    for fn in SCORERS.values():
        assert fn(pred, gold) in (0.0, 1.0)
        assert fn(pred, pred) in (0.0, 1.0)
    assert choice(pred, gold, choices=[gold, pred, "x"]) in (0.0, 1.0)


def test_scorers_are_fast_on_huge_inputs() -> None:
    huge = "1 " * 200_000 + "\\frac{" * 1000
    start = time.monotonic()
    for fn in SCORERS.values():
        assert fn(huge, "1") == 0.0
        assert fn("1", huge) == 0.0
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------- format, cost, total

@pytest.mark.parametrize("n_invalid,answered,penalty,expected", [
    (0, True, 1.0, 0.0),
    (1, True, 1.0, -1.0),
    (3, True, 1.0, -1.0),      # one penalty per episode, not per turn
    (0, False, 1.0, -1.0),
    (2, False, 0.5, -0.5),
    (0, False, 0.0, 0.0),
])
def test_format_reward(n_invalid: int, answered: bool, penalty: float, expected: float) -> None:
    assert format_reward(n_invalid, answered, penalty) == expected


def test_format_reward_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        format_reward(-1, True)
    with pytest.raises(ValueError):
        format_reward(0, True, penalty=-1.0)


def test_cost_reward() -> None:
    assert cost_reward(0.002, 0.1, 1e-3) == pytest.approx(-0.2)
    assert cost_reward(0.002, 0.0, 1e-3) == 0.0
    assert str(cost_reward(0.0, 0.5, 1e-3)) == "0.0"  # no -0.0
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cost_scale"):
            cost_reward(1.0, 0.1, scale)
    with pytest.raises(ValueError, match="cost_lambda"):
        cost_reward(1.0, -0.1, 1e-3)
    with pytest.raises(ValueError, match="cost"):
        cost_reward(-1.0, 0.1, 1e-3)


def test_cost_on_success_charges_only_right_answers() -> None:
    """cost_on_success: a wrong answer scores 0 whatever it cost (a cheap failure is no better
    than a dear one); a right one pays its cost, so the cheapest right route scores highest."""
    cfg = RewardConfig(cost_lambda=0.3, cost_scale=0.05, cost_on_success=True)
    kw = dict(scorer="exact", n_invalid_turns=0, answered=True, config=cfg)
    dear_right, cheap_right = compute_reward("7", "7", cost=0.03, **kw), compute_reward("7", "7", cost=0.001, **kw)
    dear_wrong, cheap_wrong = compute_reward("8", "7", cost=0.03, **kw), compute_reward("8", "7", cost=0.0005, **kw)
    assert dear_right.total == pytest.approx(1 - 0.3 * 0.6) and cheap_right.total == pytest.approx(1 - 0.3 * 0.02)
    assert dear_wrong.total == cheap_wrong.total == 0.0 and dear_wrong.cost_term == 0.0
    paper = compute_reward("8", "7", cost=0.03, **{**kw, "config": RewardConfig(cost_lambda=0.3, cost_scale=0.05)})
    assert paper.total == pytest.approx(-0.18)  # the paper's reward charges the failure


def test_total_reward_is_the_sum() -> None:
    assert total_reward(1.0, -1.0, -0.25) == pytest.approx(-0.25)


def test_reward_config_defaults_help_and_frozen() -> None:
    cfg = RewardConfig()
    assert (cfg.format_penalty, cfg.cost_lambda, cfg.cost_scale) == (1.0, 0.0, 1e-3)
    for f in dataclasses.fields(RewardConfig):
        assert f.metadata["help"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cost_lambda = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,field_name", [
    ({"format_penalty": -1.0}, "format_penalty"),
    ({"format_penalty": float("nan")}, "format_penalty"),
    ({"cost_lambda": -0.5}, "cost_lambda"),
    ({"cost_lambda": "0.1"}, "cost_lambda"),
    ({"cost_scale": 0.0}, "cost_scale"),
    ({"cost_scale": -1e-3}, "cost_scale"),
    ({"cost_scale": True}, "cost_scale"),
])
def test_reward_config_validation(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ConfigError) as e:
        RewardConfig(**kwargs)
    assert e.value.field == field_name and e.value.fix
    assert field_name in str(e.value) and "Fix:" in str(e.value)


def test_compute_reward() -> None:
    cfg = RewardConfig(cost_lambda=0.1, cost_scale=1e-3)
    rb = compute_reward("(b)", "B", "choice", n_invalid_turns=0, answered=True, cost=0.002, config=cfg)
    assert rb == RewardBreakdown(outcome=1.0, format_score=0.0, cost_term=pytest.approx(-0.2),
                                 total=pytest.approx(0.8))
    rb = compute_reward("Paris", "B", "choice", n_invalid_turns=1, answered=True, cost=0.0,
                        config=RewardConfig(), choices=CITIES)
    assert (rb.outcome, rb.format_score, rb.cost_term, rb.total) == (1.0, -1.0, 0.0, 0.0)
    rb = compute_reward(None, "5", "numeric", n_invalid_turns=0, answered=False, cost=0.0,
                        config=RewardConfig())
    assert (rb.outcome, rb.total) == (0.0, -1.0)
    # Not answered: no outcome credit even if some text was passed along.
    rb = compute_reward("5", "5", "numeric", n_invalid_turns=0, answered=False, cost=0.0,
                        config=RewardConfig())
    assert rb.outcome == 0.0
    with pytest.raises(ConfigError):
        compute_reward("5", "5", "nope", n_invalid_turns=0, answered=False, cost=0.0,
                       config=RewardConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rb.total = 2.0  # type: ignore[misc]
    assert pymath.isfinite(rb.total)
