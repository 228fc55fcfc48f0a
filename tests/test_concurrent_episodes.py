"""200 concurrent scripted episodes against 3 real loopback HTTP experts with latency.

All episodes are stored with every step; rerunning them (with a fresh in-memory cache in
front of the same persistent store) hits the cache for >= 95% of calls, spends almost no
expert time, and gives the same rewards and reported costs as the first run."""

import re

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import ScriptedPolicy, information_text
from maestro_core.protocol import unescape
from maestro_core.registry import parse_registry
from maestro_core.store import Store
from tests.openai_server import OpenAIServer, message_text

LATENCY = 0.05


def _last_user(messages):
    return message_text([m for m in messages if m["role"] == "user"][-1])


def add_expert(messages):
    nums = [int(x) for x in re.findall(r"-?\d+", _last_user(messages))]
    return str(sum(nums))


def count_expert(messages):
    m = re.search(r"'(.*)'", _last_user(messages))
    return str(len(m.group(1).split())) if m else "0"


def upper_expert(messages):
    m = re.search(r"'(.*)'", _last_user(messages))
    return m.group(1).upper() if m else ""


def registry_for(servers):
    experts = []
    for name, srv, caps in zip(["adder", "counter", "shouter"], servers, [["sum"], ["count"], ["case"]]):
        experts.append({"name": name, "capabilities": caps, "max_concurrency": 64, "timeout_s": 10,
                        "backend": {"kind": "http", "base_url": srv.base_url, "model": name},
                        "price": {"input_per_1m": 1.0, "output_per_1m": 4.0}})
    return parse_registry({
        "name": "loopback", "capabilities": {"sum": "adds", "count": "counts words", "case": "upper-cases"},
        "experts": experts,
        "skills": [{"name": s, "requires": [c], "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]}
                   for s, c in [("add", "sum"), ("count", "count"), ("upper", "case")]],
    })


def items(n=200, *, unique=False):
    """Three kinds of question; `unique`: every question different (no call answered from the cache)."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(Item(f"a{i}", "add", f"Add {i} and {i + 7}", str(2 * i + 7), "numeric"))
        elif kind == 1:
            words = " ".join([f"w{i}" if unique else "w"] * (1 + i % 9))
            out.append(Item(f"c{i}", "count", f"How many words in '{words}'?", str(1 + i % 9), "numeric"))
        else:
            out.append(Item(f"u{i}", "upper", f"Upper-case 'item {i}'", f"ITEM {i}", "exact"))
    return out


def route(question, observations, view):
    if observations:
        info = information_text(observations[-1])
        return f"<answer>{unescape(info) if info else '?'}</answer>"
    if question.startswith("Add"):
        return f"<call>adder@@add: {question}</call>"
    if question.startswith("How many"):
        return f"<call>counter@@count: {question}</call>"
    return f"<call>shouter@@upper: {question}</call>"


async def test_200_concurrent_episodes_stored_and_cached(tmp_path):
    with OpenAIServer(add_expert, latency_s=LATENCY) as s1, OpenAIServer(count_expert, latency_s=LATENCY) as s2, \
            OpenAIServer(upper_expert, latency_s=LATENCY) as s3:
        registry = registry_for([s1, s2, s3])
        data = items(200)
        with Store(tmp_path / "home") as store:
            experts = build_experts(registry)
            runner = EpisodeRunner(registry, experts, ScriptedPolicy(route), cache=ExpertCache(store))
            first = await runner.run(data, run_id="conc", iteration=0)
            store.write_and_ingest(first, "conc", 0, chunk=0)
            requests_first = s1.requests + s2.requests + s3.requests

            assert len(first) == 200 and all(t.outcome == 1.0 for t in first)
            assert store.count_episodes("conc") == 200
            assert store.count_steps("conc") == sum(len(t.steps) for t in first) == 400
            stored = {t.episode_id: t for t in store.trajectories("conc")}
            assert all(stored[t.episode_id] == t for t in first)  # every step, exactly
            assert requests_first == len({it.question for it in data})  # identical calls paid once
            spent_first = sum(t.spent_s for t in first)

            # a new runner and an empty in-memory cache: hits come from the persistent store
            runner2 = EpisodeRunner(registry, experts, ScriptedPolicy(route), cache=ExpertCache(store))
            second = await runner2.run(data, run_id="conc", iteration=1)
            store.write_and_ingest(second, "conc", 1, chunk=0)
            for e in experts.values():
                await e.aclose()

        calls = [s for t in second for s in t.steps if s.action == "call"]
        hit_rate = sum(1 for s in calls if s.cache_hit) / len(calls)
        assert hit_rate >= 0.95
        assert s1.requests + s2.requests + s3.requests - requests_first <= 0.05 * 200
        assert sum(t.spent_s for t in second) < 0.1 * spent_first
        for a, b in zip(first, second):
            assert (a.reward, a.total_cost, a.total_latency_s) == (b.reward, b.total_cost, b.total_latency_s)
        # reported latency is the expert's, not the time spent now
        assert all(s.latency_s >= LATENCY for s in calls)
