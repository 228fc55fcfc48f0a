"""Solver workflows: dispatch, prompt/tool/code steps, helper experts, templates."""

import pytest

from maestro_core.experts import build_experts
from maestro_core.protocol import Call
from maestro_core.registry import parse_registry
from maestro_core.skills import render, resolve_solver, run_skill


@pytest.fixture
def reg(registry_dict):
    registry_dict["skills"].append({"name": "program", "requires": ["arithmetic"], "solvers": [
        {"name": "python", "steps": [{"code": "print(sum(range({input})))"}]},
        {"name": "helper_then_tool", "steps": [
            {"prompt": "count words in {input}", "expert": "counter", "save_as": "n"},
            {"prompt": "{n} * 10"},
            {"tool": "extract_number", "input": "result: {prev}"}]},
    ]})
    return parse_registry(registry_dict)


def test_render_leaves_unknown_braces():
    assert render("{input} {x} {{y}} {prev}", {"input": "a", "prev": "b"}) == "a {x} {{y}} b"


def test_bare_skill_dispatches(reg):
    assert resolve_solver(reg, Call("counter", "text", None, "the letter e in 'tree'")).name == "letters"
    assert resolve_solver(reg, Call("counter", "text", None, "'a b c'")).name == "words"
    assert resolve_solver(reg, Call("counter", "text", "letters", "'a b'")).name == "letters"


async def test_prompt_step_prices_the_call(reg):
    res = await run_skill(reg, build_experts(reg), Call("calc", "math", "calculator", "6 * 7"))
    assert (res.text, res.solver, res.expert_calls) == ("42", "calculator", 1)
    assert res.cost == pytest.approx(0.001) and res.confidence == 1.0


async def test_helper_expert_and_tool_steps(reg):
    res = await run_skill(reg, build_experts(reg), Call("calc", "program", "helper_then_tool", "'a b c'"))
    assert res.text == "30" and res.expert_calls == 2
    assert res.cost == pytest.approx(0.002 + 0.001)  # the helper's price counts too


async def test_code_step_runs_in_sandbox(reg):
    res = await run_skill(reg, build_experts(reg), Call("calc", "program", "python", "10"))
    assert res.text == "45"
    bad = await run_skill(reg, build_experts(reg), Call("calc", "program", "python", "10)); import socket; "
                                                                                       "socket.create_connection(('127.0.0.1', 22"))
    assert bad.text.startswith("code failed")
