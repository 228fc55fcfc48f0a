"""Rollout throughput: N concurrent episodes against a loopback HTTP expert, as a fraction of
the expert-bound limit.

    .venv/bin/python benchmarks/rollout_throughput.py [--small]

Setup: one OpenAI-compatible expert (tests/openai_server.py, standard-library HTTP/1.1 with
keep-alive) in its own process on 127.0.0.1, answering every request after a fixed latency L.
The registry's expert has max_concurrency = N, the runner EpisodeConfig.max_concurrency = N.
The policy is scripted: turn 0 `<call>llm@@chat</call>` (forwards the question), turn 1
`<answer>...</answer>`; so each episode makes k = 1 expert call. Every question is distinct, so
every call misses the (in-memory) expert cache and goes over HTTP; the cache keys are still
computed, as in training.

Expert-bound limit: with N episodes in flight and at least N expert slots, an episode cannot
take less than k x L, so the fastest possible rate is N / (k x L) episodes/s. The figure is
    ratio = measured episodes/s / (N / (k x L)) = (E x k x L / N) / wall
over E = waves x N episodes (after a warm-up of N episodes that opens the connections).
Target: ratio >= 0.8 at N = 64 (L = 50 ms). Without --small, one more row for context:
N = 64 at L = 200 ms (the same episodes at a quarter of the request rate).

Also reported: the orchestrating process's CPU time per episode (policy, parsing, cache keys,
HTTP client, event loop), the server process's CPU per request, and the CPU per request of
HTTPExpert.generate alone (64 at a time, no runner): the HTTP client's share of the episode's
CPU. Episodes that start together stay in step (same latency), so each wave's CPU work adds to
L instead of overlapping it: roughly ratio ~ L / (L + N x client CPU per episode).
"""

from __future__ import annotations

import asyncio
import time

import _common

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import ScriptedPolicy

TARGET = 0.8
CALLS_PER_EPISODE = 1


def items(n: int, offset: int) -> list[Item]:
    return [Item(f"q{offset + i}", "bench", f"What is {offset + i} plus one?", str(offset + i + 1), "numeric")
            for i in range(n)]


def measure(n: int, latency_s: float, waves: int) -> dict:
    with _common.ExpertServerProcess(latency_s) as srv:
        registry = _common.http_registry({"llm": srv.base_url}, max_concurrency=n)
        policy = ScriptedPolicy.from_turns(["<call>llm@@chat</call>", "<answer>42</answer>"])
        config = EpisodeConfig(max_turns=2, max_concurrency=n, call_timeout_s=60)

        async def go() -> tuple[float, float, list]:
            experts = build_experts(registry)
            try:
                runner = EpisodeRunner(registry, experts, policy, cache=ExpertCache(None), config=config)
                await runner.run(items(n, 10**6), run_id="warmup")  # opens the N connections
                cpu0, t0 = time.process_time(), time.perf_counter()
                trajs = await runner.run(items(waves * n, 0), run_id="bench")
                return time.perf_counter() - t0, time.process_time() - cpu0, trajs
            finally:
                for e in experts.values():
                    await e.aclose()

        wall, cpu, trajs = asyncio.run(go())
    server = srv.stats()
    episodes = len(trajs)
    errors = sum(1 for t in trajs for s in t.steps if s.error)
    assert all(t.n_calls == CALLS_PER_EPISODE for t in trajs), "every episode must make exactly one call"
    limit = n / (CALLS_PER_EPISODE * latency_s)
    eps = episodes / wall
    call_lat = sorted(s.latency_s for t in trajs for s in t.steps if s.action == "call")
    return {"concurrency": n, "latency_s": latency_s, "episodes": episodes, "wall_s": wall,
            "episodes_per_s": eps, "limit_episodes_per_s": limit, "ratio": eps / limit,
            "client_cpu_us_per_episode": 1e6 * cpu / episodes,
            "server_cpu_us_per_request": 1e6 * server.get("cpu_s", 0.0) / max(1, server.get("requests", 1)),
            "server_max_in_flight": server.get("max_in_flight"),
            "call_latency_p50_s": call_lat[len(call_lat) // 2], "errors": errors}


def http_client_cpu(n: int, latency_s: float, waves: int) -> float:
    """CPU us per request of HTTPExpert.generate alone (no runner), n requests at a time."""
    with _common.ExpertServerProcess(latency_s) as srv:
        registry = _common.http_registry({"llm": srv.base_url}, max_concurrency=n)

        async def go() -> float:
            expert = build_experts(registry)["llm"]
            msgs = [{"role": "user", "content": "What is 3 plus one?"}]
            try:
                await asyncio.gather(*[expert.generate(msgs) for _ in range(n)])
                cpu0 = time.process_time()
                for _ in range(waves):
                    await asyncio.gather(*[expert.generate(msgs) for _ in range(n)])
                return time.process_time() - cpu0
            finally:
                await expert.aclose()

        cpu = asyncio.run(go())
    return 1e6 * cpu / (n * waves)


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    latency = 0.05
    sizes = [16, 64] if args.small else [16, 64, 256]
    waves = 3 if args.small else 20
    rows = [measure(n, latency, waves) for n in sizes]
    if not args.small:  # context: the same N = 64 with a slower expert needs 4x less client CPU per second
        rows.append(measure(64, 0.2, 10))
    http_us = http_client_cpu(64, latency, waves)
    _common.print_table(
        ["N", "L ms", "episodes", "wall s", "eps/s", "limit eps/s", "ratio", "client CPU us/ep",
         "server CPU us/req", "max in flight", "errors"],
        [[r["concurrency"], r["latency_s"] * 1e3, r["episodes"], r["wall_s"], r["episodes_per_s"],
          r["limit_episodes_per_s"], r["ratio"], r["client_cpu_us_per_episode"], r["server_cpu_us_per_request"],
          r["server_max_in_flight"], r["errors"]] for r in rows])
    at64 = next((r["ratio"] for r in rows if r["concurrency"] == 64 and r["latency_s"] == latency), None)
    met = at64 is not None and at64 >= TARGET
    print(f"\nHTTPExpert.generate alone (64 at a time): {http_us:.0f} us CPU per request")
    print(f"ratio at N=64: {at64:.3f} (target >= {TARGET}: {'met' if met else 'NOT met'})")
    _common.write_result("rollout_throughput", args, {
        "definition": "ratio = (episodes/s) / (N / (calls_per_episode * L)); expert max_concurrency = N",
        "calls_per_episode": CALLS_PER_EPISODE, "rows": rows, "http_client_cpu_us_per_request_at_64": http_us,
        "target": {"metric": "ratio at N=64", "min": TARGET, "value": at64, "met": met}}, started)


if __name__ == "__main__":
    main()
