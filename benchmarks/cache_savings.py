"""Expert-cache savings over GRPO-like iterations: calls and expert seconds not paid again.

    .venv/bin/python benchmarks/cache_savings.py [--small]

Setup: three loopback HTTP experts (tests/openai_server.py in this process, each answering
after L = 20 ms) behind one skill, so the valid pairs are a@@chat, b@@chat, c@@chat. One
collection = K items x G = 8 episodes, all in flight at once, like a GRPO iteration. The
policy routes at random (seeded by episode and turn): turn 0 calls a random pair with the
question, turn 1 calls another random pair with probability 1/2 (else answers), turn 2
answers. The cache is the store-backed ExpertCache, as in training.

Iteration 1 runs on an empty cache: the savings come from identical calls inside a group
(the same question to the same pair), which run once while in flight. Iteration 2 runs the
same items (new random routes) with a NEW ExpertCache over the same store (as a restarted
process would), so hits come from DuckDB.

Figures, per iteration:
- calls saved = 1 - HTTP requests the servers received / call steps the episodes made;
- expert seconds saved = 1 - sum(step.spent_s) / sum(step.latency_s) over call steps
  (latency_s is the call's original latency, also on a hit; spent_s is what it cost now);
- wall time, against the same collection with caching off (experts marked non-deterministic).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time

import _common

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import EpisodeView, ScriptedPolicy, information_text
from maestro_core.protocol import unescape
from maestro_core.store import Store
from tests.openai_server import OpenAIServer

LATENCY_S = 0.02
G = 8
PAIRS = ("a@@chat", "b@@chat", "c@@chat")


def route(question: str, observations: list[str], view: EpisodeView) -> str:
    rng = random.Random(f"{view.episode_id}:{view.turn}")
    if view.turn == 0 or (view.turn == 1 and rng.random() < 0.5):
        return f"<call>{rng.choice(PAIRS)}</call>"
    info = information_text(observations[-1]) if observations else None
    return f"<answer>{unescape(info) if info else 'unknown'}</answer>"


def items(k: int) -> list[Item]:
    return [Item(f"item-{i}", "bench", f"What is {i} plus {2 * i}?", str(3 * i), "numeric") for i in range(k)]


def collect(registry, cache, data, iteration: int, servers) -> dict:
    policy = ScriptedPolicy(route)
    config = EpisodeConfig(max_turns=3, max_concurrency=len(data) * G, call_timeout_s=60)
    before = sum(s.requests for s in servers)

    async def go():
        experts = build_experts(registry)
        try:
            runner = EpisodeRunner(registry, experts, policy, cache=cache, config=config)
            t0 = time.perf_counter()
            trajs = await runner.run(data, group_size=G, run_id="cache", iteration=iteration)
            return trajs, time.perf_counter() - t0
        finally:
            for e in experts.values():
                await e.aclose()

    trajs, wall = asyncio.run(go())
    calls = [s for t in trajs for s in t.steps if s.action == "call"]
    assert not any(s.error for s in calls), [s.error_message for s in calls if s.error][:3]
    requests = sum(s.requests for s in servers) - before
    latency = sum(s.latency_s for s in calls)
    spent = sum(s.spent_s for s in calls)
    return {"iteration": iteration, "episodes": len(trajs), "calls": len(calls), "requests": requests,
            "calls_saved": 1 - requests / len(calls), "expert_s_without_cache": latency, "expert_s_spent": spent,
            "expert_s_saved": 1 - spent / latency, "wall_s": wall,
            "cache_hits": sum(1 for s in calls if s.cache_hit)}


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    k = 4 if args.small else 32
    data = items(k)
    servers = [OpenAIServer(lambda m, r=r: r, latency_s=LATENCY_S) for r in ("41", "42", "43")]
    for s in servers:
        s.start()
    try:
        urls = {name: s.base_url for name, s in zip("abc", servers)}
        conc = k * G
        cached = _common.http_registry(urls, max_concurrency=conc)
        uncached = _common.http_registry(urls, max_concurrency=conc, deterministic=False)
        base = collect(uncached, ExpertCache(None), data, 0, servers)
        with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
            first = collect(cached, ExpertCache(store), data, 0, servers)
            second = collect(cached, ExpertCache(store), data, 1, servers)  # new process: hits come from DuckDB
            stored = store.counts()["expert_cache"]
    finally:
        for s in servers:
            s.stop()
    assert base["calls_saved"] == 0.0, "without caching every call must reach a server"
    rows = [("no cache (baseline)", base), ("iteration 1 (empty cache)", first), ("iteration 2 (same items)", second)]
    print(f"K={k} items x G={G}, 3 pairs, expert latency {LATENCY_S * 1e3:.0f} ms\n")
    _common.print_table(
        ["run", "calls", "HTTP requests", "calls saved", "expert s (no cache)", "expert s spent", "expert s saved",
         "wall s"],
        [[name, r["calls"], r["requests"], r["calls_saved"], r["expert_s_without_cache"], r["expert_s_spent"],
          r["expert_s_saved"], r["wall_s"]] for name, r in rows])
    print(f"\nexpert_cache rows in the store: {stored}")
    _common.write_result("cache_savings", args, {
        "items": k, "group_size": G, "pairs": list(PAIRS), "expert_latency_s": LATENCY_S,
        "no_cache": base, "iteration_1": first, "iteration_2": second, "expert_cache_rows": stored,
        "within_iteration_calls_saved": first["calls_saved"], "within_iteration_expert_s_saved": first["expert_s_saved"],
        "second_iteration_calls_saved": second["calls_saved"],
        "second_iteration_expert_s_saved": second["expert_s_saved"]}, started)


if __name__ == "__main__":
    main()
