"""Episode runner with the scripted policy and in-process experts."""

import asyncio
import re

import pytest

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner, build_messages
from maestro_core.experts import build_experts
from maestro_core.experts.base import ExpertBackend
from maestro_core.policy import ScriptedPolicy, information_text
from maestro_core.protocol import unescape
from maestro_core.rewards import RewardConfig

ITEMS = [Item(id=f"m{i}", benchmark="math", question=f"What is {i} + {i * 3}?", answer=str(4 * i), scorer="numeric")
         for i in range(1, 6)]


def router(question, observations, view):
    """Call the calculator on the expression, then answer with what it returned."""
    if observations:
        info = information_text(observations[-1])
        return f"<answer>{unescape(info) if info else 'unknown'}</answer>"
    expr = re.search(r"(\d+ \+ \d+)", question).group(1)
    return f"<think>arithmetic</think><call>calc@@math: {expr}</call>"


async def test_scripted_episodes_score_and_record(registry):
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy(router))
    trajs = await runner.run(ITEMS, group_size=2, run_id="t", iteration=0)
    assert len(trajs) == 10
    for t in trajs:
        assert t.finish_reason == "answer" and t.outcome == 1.0 and t.format_score == 0.0
        assert [s.action for s in t.steps] == ["call", "answer"]
        call = t.steps[0]
        assert call.expert == "calc" and call.solver == "calculator" and call.cost == pytest.approx(0.001)
        assert call.observation.startswith("<information>") and t.total_cost == pytest.approx(0.001)
        assert t.registry_version == registry.version and t.checkpoint_id == "scripted"
    assert len({t.episode_id for t in trajs}) == 10


async def test_invalid_turns_cost_format_penalty_and_never_crash(registry):
    turns = ["I think it is 4", "<call>calc@@text: 2+2</call>", "<call>nobody@@math: 1</call>", "<answer>4</answer>"]
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy.from_turns(turns),
                           config=EpisodeConfig(max_turns=4))
    (t,) = await runner.run([ITEMS[0]])
    assert [s.error for s in t.steps] == ["malformed", "incompatible_pair", "unknown_expert", None]
    assert all(s.observation.startswith("<information>error (") for s in t.steps[:3])
    assert t.final_answer == "4" and t.outcome == 1.0 and t.format_score == -1.0 and t.reward == 0.0


async def test_turn_limit_ends_without_answer(registry):
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy.from_turns(["<call>calc@@math: 1+1</call>"]),
                           config=EpisodeConfig(max_turns=3))
    (t,) = await runner.run([ITEMS[0]])
    assert t.finish_reason == "max_turns" and t.final_answer is None and t.outcome == 0.0
    assert len(t.steps) == 3 and t.n_calls == 3
    assert t.n_cache_hits == 2  # the same deterministic call, paid once


async def test_budget_refuses_calls(registry):
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy.from_turns(
        ["<call>calc@@math: 1+1</call>", "<call>calc@@math: 2+2</call>", "<answer>2</answer>"]),
        config=EpisodeConfig(cost_budget=0.0005))
    (t,) = await runner.run([ITEMS[0]])
    assert t.steps[0].error is None and t.steps[1].error == "budget" and t.finish_reason == "budget"
    assert "budget" in build_messages(registry, ITEMS[0], cost_budget=0.0005)[1]["content"].lower()


class _Slow(ExpertBackend):
    async def _generate(self, messages, images):
        await asyncio.sleep(5)


class _Broken(ExpertBackend):
    async def _generate(self, messages, images):
        from maestro_core.errors import ExpertHTTPError
        raise ExpertHTTPError("boom", status=500, expert=self.name)


async def test_timeouts_and_expert_failures_become_observations(registry):
    experts = build_experts(registry)
    experts["calc"] = _Slow(registry.experts["calc"])
    experts["counter"] = _Broken(registry.experts["counter"])
    policy = ScriptedPolicy.from_turns(["<call>calc@@math: 1+1</call>", "<call>counter@@text: 'a b'</call>",
                                        "<answer>2</answer>"])
    runner = EpisodeRunner(registry, experts, policy, config=EpisodeConfig(call_timeout_s=0.2))
    (t,) = await runner.run([ITEMS[0]])
    assert [s.error for s in t.steps] == ["timeout", "expert_error", None]
    assert "timed out" in t.steps[0].observation and "HTTP 500" in t.steps[1].observation
    assert t.format_score == 0.0  # expert trouble is not the policy's format error


async def test_cost_lambda_enters_reward_and_prompt(registry):
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy(router),
                           config=EpisodeConfig(reward=RewardConfig(cost_scale=0.001)))
    trajs = await runner.run(ITEMS[:2], group_size=2, cost_lambda=lambda k: 0.5 * k)
    assert [t.cost_lambda for t in trajs] == [0.0, 0.5, 1.0, 1.5]
    assert [round(t.cost_term, 6) for t in trajs] == [0.0, -0.5, -1.0, -1.5]
    assert "Cost weight: 0.5" in trajs[1].prompt_text


async def test_cache_hits_keep_original_cost_and_rewards(registry):
    cache = ExpertCache(None)
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy(router), cache=cache)
    first = await runner.run(ITEMS, run_id="a")
    second = await runner.run(ITEMS, run_id="a")
    assert all(s.cache_hit is False for t in first for s in t.steps if s.action == "call")
    assert all(s.cache_hit is True for t in second for s in t.steps if s.action == "call")
    for a, b in zip(first, second):
        assert (a.reward, a.total_cost, a.total_latency_s) == (b.reward, b.total_cost, b.total_latency_s)


def test_compact_prompt_lists_only_actions(registry):
    msgs = build_messages(registry, ITEMS[0], compact=True)
    assert msgs[0]["content"].startswith("Actions: calc@@math ")
    assert "Experts:" not in msgs[0]["content"] and "<call>ACTION: input</call>" in msgs[0]["content"]
    assert msgs[1]["content"] == f"Question: {ITEMS[0].question}"


async def test_call_without_input_forwards_the_question(registry):
    runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy(
        lambda q, obs, v: "<call>calc@@math</call>" if not obs else f"<answer>{information_text(obs[-1])}</answer>"))
    (t,) = await runner.run([ITEMS[2]])
    assert t.steps[0].call_input == ITEMS[2].question and t.outcome == 1.0
