"""Every level-2 solver of the Maestro-Mini registry on real rendered images, real experts.

Each solver runs through `run_skill` with the expert it is meant for, on items made by the
suite's own generators; the assertions are the accuracy each solver must reach (or, for the
weak LMs, that the workflow runs end to end and prices its tokens)."""

import asyncio

import pytest

from maestro_core.benchmarks import charts, digits, hires, math as bmath, text_reading
from maestro_core.experts import build_experts
from maestro_core.protocol import Call
from maestro_core.registry import DEFAULT_REGISTRY, load_registry
from maestro_core.rewards import score_answer
from maestro_core.skills import run_skill

pytestmark = pytest.mark.slow

REG = load_registry(DEFAULT_REGISTRY)


@pytest.fixture(scope="module")
def experts():
    return build_experts(REG)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tmp_path_factory.mktemp("solver-images")


def accuracy(experts, items, expert, skill, solver):
    async def go():
        outs = await asyncio.gather(*(run_skill(REG, experts, Call(expert, skill, solver, it.question), it.images,
                                                solver=REG.skills[skill].solvers[solver]) for it in items))
        return outs
    outs = asyncio.run(go())
    return sum(score_answer(o.text, it.answer, it.scorer, choices=it.choices) for o, it in zip(outs, items)) / len(items), outs


def test_math_calculator(experts, images):
    items = [it for it in bmath.generate(30, 1, images) if "=" in it.question or "Calculate" in it.question][:12]
    acc, _ = accuracy(experts, items, "calc", "math", "calculator")
    assert acc >= 0.9


def test_math_word_problem_runs_lm_then_calculator(experts, images):
    items = [it for it in bmath.generate(12, 2, images)][:6]
    acc, outs = accuracy(experts, items, "smollm2-135m", "math", "word_problem")
    assert all(o.expert_calls == 1 and o.tokens_out > 0 and o.cost > 0 for o in outs)
    print("smollm2 word_problem accuracy", acc)


@pytest.mark.parametrize("solver, word", [("value_lookup", "value for"), ("extremum", "est value"),
                                          ("difference", "difference")])
def test_chart_solvers(experts, images, solver, word):
    items = [it for it in charts.generate(45, 3, images) if word in it.question][:6]
    assert len(items) >= 4
    acc, _ = accuracy(experts, items, "rapidocr", "chart", solver)
    assert acc >= 0.8


def test_text_reading_full_page(experts, images):
    items = text_reading.generate(10, 4, images)
    acc, _ = accuracy(experts, items, "rapidocr", "text_reading", "full_page")
    assert acc >= 0.7


def test_text_reading_zoom_region(experts, images):
    items = [it for it in hires.generate(16, 5, images) if "code" in it.question][:6]
    zoom, _ = accuracy(experts, items, "rapidocr", "text_reading", "zoom_region")
    assert zoom >= 0.8


def test_perception_digit_and_zoom_digit(experts, images):
    acc, _ = accuracy(experts, digits.generate(12, 6, images), "digit-cnn", "perception", "digit")
    assert acc >= 0.75
    boxed = [it for it in hires.generate(16, 7, images) if "digit" in it.question][:5]
    zacc, _ = accuracy(experts, boxed, "digit-cnn", "perception", "zoom_digit")
    assert zacc >= 0.6


def test_general_direct_answer_runs(experts, images):
    items = [it for it in bmath.generate(3, 8, images)]
    _, outs = accuracy(experts, items, "gemma3-270m", "general", "direct_answer")
    assert all(o.tokens_in > 0 and o.tokens_out > 0 and "\n" not in o.text for o in outs)
