"""Load (issue #7): 1,000 concurrent episodes against real loopback HTTP experts, three times.

Each round runs 1,000 scripted episodes at once (EpisodeConfig.max_concurrency 1000; every
episode is in flight before the first one ends) against the three experts of
test_concurrent_episodes (adder, counter, shouter: OpenAIServer with 50 ms latency, 64
requests in flight per expert), with a fresh memory-only expert cache, so every call reaches
a server; then `Store.write_and_ingest`. Checked: no errors, every episode right, every
episode and step in the store. Memory: the process's RSS (psutil; the servers run in this
process too) is sampled every 10 ms for the peak and measured after each round, and so is
the number of live Python heap blocks (`sys.getallocatedblocks()`). Once rounds 0 and 1 have
warmed up (connection pools, DuckDB buffers), each later round may grow RSS by at most
RSS_GROWTH_BOUND_MB (DuckDB keeps more of the growing tables in its buffer: a few MB per
round) and the Python heap by at most BLOCKS_GROWTH_BOUND blocks, a small fraction of the
blocks one round's 1,000 trajectories take while they are alive (reported), so a runner,
cache or client that kept them would fail.
"""

from __future__ import annotations

import gc
import sys
import threading
import time

import psutil
import pytest

from maestro_core.cache import ExpertCache
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import ScriptedPolicy
from maestro_core.store import Store
from tests.openai_server import OpenAIServer
from tests.reliability_figures import figures  # noqa: F401 (fixture)
from tests.test_concurrent_episodes import (LATENCY, add_expert, count_expert, items, registry_for, route,
                                            upper_expert)

N_EPISODES = 1000
ROUNDS = 4
RSS_GROWTH_BOUND_MB = 20.0
BLOCKS_GROWTH_BOUND = 3000
MB = 1024 * 1024


class RssSampler:
    """Peak RSS of this process, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.01):
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class InFlight:
    """Wraps the scripted route; counts episodes between their first turn and their answer."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0

    def __call__(self, question, observations, view):
        if view.turn == 0:
            self.now += 1
            self.max = max(self.max, self.now)
        text = route(question, observations, view)
        if text.startswith("<answer>"):
            self.now -= 1
        return text


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.slow
async def test_1000_concurrent_episodes_no_errors_no_leak_no_lost_steps(tmp_path, figures):  # noqa: F811
    data = items(N_EPISODES, unique=True)
    rounds = []
    with OpenAIServer(add_expert, latency_s=LATENCY) as s1, OpenAIServer(count_expert, latency_s=LATENCY) as s2, \
            OpenAIServer(upper_expert, latency_s=LATENCY) as s3:
        servers = (s1, s2, s3)
        registry = registry_for(servers)
        experts = build_experts(registry)
        config = EpisodeConfig(max_concurrency=N_EPISODES, max_turns=2)
        rss_start = _rss()
        try:
            with Store(tmp_path / "home") as store, RssSampler() as sampler:
                for r in range(ROUNDS):
                    before = sum(s.requests for s in servers)
                    tracker = InFlight()
                    runner = EpisodeRunner(registry, experts, ScriptedPolicy(tracker), cache=ExpertCache(None),
                                           config=config)
                    t0 = time.perf_counter()
                    trajs = await runner.run(data, run_id="load", iteration=r)
                    run_s = time.perf_counter() - t0
                    store.write_and_ingest(trajs, "load", r, chunk=0)
                    total_s = time.perf_counter() - t0
                    calls = [s for t in trajs for s in t.steps if s.action == "call"]
                    errors = sum(1 for t in trajs for s in t.steps if s.error)
                    stored_eps, stored_steps = store.count_episodes("load", r), store.count_steps("load", r)
                    n_steps = sum(len(t.steps) for t in trajs)
                    right = sum(t.outcome == 1.0 for t in trajs)
                    held_blocks = sys.getallocatedblocks()
                    del trajs, calls, runner
                    for s in servers:
                        with s._lock:
                            s.received.clear()  # the test server's own log of bodies, not ours
                    rounds.append({
                        "round": r, "episodes": N_EPISODES, "max_episodes_in_flight": tracker.max,
                        "requests": sum(s.requests for s in servers) - before, "errors": errors, "right": right,
                        "episodes_stored": stored_eps, "steps_stored": stored_steps, "steps_made": n_steps,
                        "episodes_wall_s": round(run_s, 2), "with_store_s": round(total_s, 2),
                        "rss_after_mb": round(_rss() / MB, 1), "peak_rss_so_far_mb": round(sampler.peak / MB, 1),
                        "heap_blocks_after": sys.getallocatedblocks(),
                        "heap_blocks_with_trajectories_alive": held_blocks,
                    })
                    assert errors == 0 and right == N_EPISODES
                    assert stored_eps == N_EPISODES and stored_steps == n_steps == 2 * N_EPISODES
                    assert rounds[-1]["requests"] == N_EPISODES  # no cache between rounds: every call sent
                    assert tracker.max == N_EPISODES  # all 1,000 were in flight at once
                total_eps = store.count_episodes("load")
                total_steps = store.count_steps("load")
        finally:
            for e in experts.values():
                await e.aclose()
        max_server_in_flight = max(s.max_in_flight for s in servers)

    assert total_eps == ROUNDS * N_EPISODES and total_steps == 2 * ROUNDS * N_EPISODES
    growth = [round(rounds[i]["rss_after_mb"] - rounds[i - 1]["rss_after_mb"], 1) for i in range(1, ROUNDS)]
    blocks = [rounds[i]["heap_blocks_after"] - rounds[i - 1]["heap_blocks_after"] for i in range(1, ROUNDS)]
    one_round_blocks = rounds[-1]["heap_blocks_with_trajectories_alive"] - rounds[-1]["heap_blocks_after"]
    figures.update({
        "rounds": rounds, "rss_start_mb": round(rss_start / MB, 1), "peak_rss_mb": round(sampler.peak / MB, 1),
        "rss_growth_per_round_after_first_mb": growth, "rss_growth_bound_mb": RSS_GROWTH_BOUND_MB,
        "heap_blocks_growth_per_round_after_first": blocks, "heap_blocks_growth_bound": BLOCKS_GROWTH_BOUND,
        "heap_blocks_of_one_round_of_trajectories": one_round_blocks, "max_requests_in_flight_per_server": max_server_in_flight,
        "episodes_stored": total_eps, "steps_stored": total_steps, "rows_lost": (ROUNDS * N_EPISODES - total_eps)
        + (2 * ROUNDS * N_EPISODES - total_steps),
    })
    assert all(g <= RSS_GROWTH_BOUND_MB for g in growth[1:]), figures
    assert all(b <= BLOCKS_GROWTH_BOUND for b in blocks[1:]), figures
    assert one_round_blocks > 5 * BLOCKS_GROWTH_BOUND  # the bound would catch one round kept alive
