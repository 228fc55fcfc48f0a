"""Orchestration overhead per episode step, in microseconds.

    .venv/bin/python benchmarks/step_overhead.py [--small]

The parts the runner adds to every call step, timed in isolation (best of 5 repeats, so that
another process's bursts on the shared cores count as little as possible):

- parse_action: parse a `<call>EXPERT@@SKILL: input</call>` turn (maestro_core/protocol.py),
  and, for reference, an `<answer>` turn;
- registry lookup: resolve_solver (the skill's dispatch among the solvers the expert can run);
- cache lookup (hit): ExpertCache.key (content hash of the call) + get_or_run on a hit;
- store write per step: Store.write_and_ingest of a chunk of B episodes (Parquet shard +
  DuckDB ingest, from Trajectory objects) divided by its steps.

Their sum is the figure; target < 1 ms (1000 us) per step.

For context, also the whole runner per step: EpisodeRunner.run over many 2-step episodes
(call + answer, scripted policy, an in-process async expert that answers at once, every call
a cache miss), wall time / steps: everything the runner does besides waiting for experts.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import timeit

import _common

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import ScriptedPolicy
from maestro_core.protocol import parse_action
from maestro_core.registry import parse_registry
from maestro_core.skills import SkillResult, resolve_solver
from maestro_core.store import Store
from maestro_core.trajectory import StepRecord, Trajectory, episode_id

TARGET_US = 1000.0
REPEATS = 5

# three experts and three skills, like the unit registry: lookups see more than one entry
REGISTRY = {
    "name": "overhead",
    "capabilities": {"arithmetic": "math", "counting": "counts", "text": "free text"},
    "experts": [
        {"name": name, "description": name, "capabilities": caps,
         "backend": {"kind": "python", "callable": "_common:instant_model"}, "price": {"per_call": 0.001},
         "max_concurrency": 256}
        for name, caps in [("calc", ["arithmetic"]), ("counter", ["counting"]), ("llm", ["text", "arithmetic"])]],
    "skills": [
        {"name": "math", "requires": ["arithmetic"], "solvers": [
            {"name": "calculator", "steps": [{"prompt": "{input}"}]},
            {"name": "checked", "steps": [{"prompt": "Check: {input}"}]}],
         "dispatch": [{"pattern": "check", "solver": "checked"}]},
        {"name": "text", "requires": ["counting"], "solvers": [{"name": "words", "steps": [{"prompt": "{input}"}]}]},
        {"name": "chat", "requires": ["text"], "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]},
    ],
}
CALL_TEXT = "<call>llm@@math: What is 17 times 23, minus 4?</call>"
ANSWER_TEXT = "<answer>387</answer>"


def per_call_us(fn, number: int) -> float:
    """Best of REPEATS runs of `number` calls, in microseconds per call."""
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=REPEATS)) / number


def async_per_call_us(make_coro, number: int) -> float:
    async def loop() -> float:
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(number):
                await make_coro()
            best = min(best, time.perf_counter() - t0)
        return best

    return 1e6 * asyncio.run(loop()) / number


def trajectory(i: int, n_steps: int) -> Trajectory:
    """A scripted-policy-like episode: calls then an answer, with the text the runner records."""
    steps = []
    for turn in range(n_steps - 1):
        steps.append(StepRecord(turn=turn, text=CALL_TEXT, action="call", expert="llm", skill="math",
                                solver="calculator", call_input="What is 17 times 23, minus 4?",
                                observation="<information>387 (confidence 0.90)</information>",
                                cost=0.001, latency_s=0.05, spent_s=0.05, cache_hit=False, tokens_in=12,
                                tokens_out=3, confidence=0.9, expert_calls=1))
    steps.append(StepRecord(turn=n_steps - 1, text=ANSWER_TEXT, action="answer"))
    item = f"item-{i // 8}"
    return Trajectory(episode_id=episode_id("overhead", 0, item, i % 8), run_id="overhead", iteration=0, chunk=0,
                      item_id=item, benchmark="bench", sample_index=i % 8, registry_version="v1",
                      checkpoint_id="scripted", prompt_text="system\nQuestion: What is 17 times 23, minus 4?",
                      prompt_ids=(), steps=tuple(steps), final_answer="387", finish_reason="answer", reward=1.0,
                      outcome=1.0, format_score=1.0, cost_term=0.0, cost_lambda=0.0, total_cost=0.001,
                      total_latency_s=0.05, spent_s=0.05, n_calls=n_steps - 1, n_cache_hits=0,
                      created_at=time.time())


def store_write_us_per_step(n_episodes: int) -> tuple[float, int]:
    trajs = [trajectory(i, 2 + i % 2) for i in range(n_episodes)]
    steps = sum(len(t.steps) for t in trajs)
    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        for chunk in range(REPEATS):
            batch = [Trajectory(**{**t.__dict__, "chunk": chunk,
                                   "episode_id": episode_id("overhead", 0, f"{t.item_id}-{chunk}", t.sample_index),
                                   "item_id": f"{t.item_id}-{chunk}"}) for t in trajs]
            t0 = time.perf_counter()
            store.write_and_ingest(batch, "overhead", 0, chunk)
            best = min(best, time.perf_counter() - t0)
    return 1e6 * best / steps, steps


def runner_us_per_step(registry, n_episodes: int) -> float:
    policy = ScriptedPolicy.from_turns(["<call>llm@@math</call>", "<answer>387</answer>"])
    items = [Item(f"q{i}", "bench", f"What is {i} times 3?", str(3 * i), "numeric") for i in range(n_episodes)]

    async def go() -> tuple[float, int]:
        experts = build_experts(registry)
        runner = EpisodeRunner(registry, experts, policy, cache=ExpertCache(None),
                               config=EpisodeConfig(max_turns=2, max_concurrency=64))
        await runner.run(items[:64], run_id="warmup")  # imports and builds the model
        best, steps = float("inf"), 0
        for r in range(3):
            runner.cache = ExpertCache(None)  # every call a miss in every repeat
            t0 = time.perf_counter()
            trajs = await runner.run(items, run_id=f"r{r}")
            best = min(best, time.perf_counter() - t0)
            steps = sum(len(t.steps) for t in trajs)
        return best, steps

    best, steps = asyncio.run(go())
    return 1e6 * best / steps


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    n = 2_000 if args.small else 20_000
    registry = parse_registry(REGISTRY, source="benchmarks")
    call = parse_action(CALL_TEXT, registry)
    solver = resolve_solver(registry, call)

    cache = ExpertCache(None)
    key = cache.key(registry, call, solver, ())
    cache.put(key, SkillResult("387", solver.name, 0.9, 0.001, 0.05, 12, 3, 1), expert="llm", skill="math")

    async def never_runs() -> SkillResult:
        raise AssertionError("a hit must not run the call")

    parts = {
        "parse_action (call)": per_call_us(lambda: parse_action(CALL_TEXT, registry), n),
        "registry lookup (resolve_solver)": per_call_us(lambda: resolve_solver(registry, call), n),
        "cache key (sha256 of the call)": per_call_us(lambda: cache.key(registry, call, solver, ()), n),
        "cache get_or_run (hit)": async_per_call_us(
            lambda: cache.get_or_run(key, never_runs, expert="llm", skill="math"), n),
    }
    batch = 256 if args.small else 2_000
    parts["store write_and_ingest per step"], steps = store_write_us_per_step(batch)
    total = sum(parts.values())
    context = {
        "parse_action (answer)": per_call_us(lambda: parse_action(ANSWER_TEXT, registry), n),
        "whole runner per step (no expert wait)": runner_us_per_step(registry, 256 if args.small else 2_000),
    }
    rows = [[k, v, "yes"] for k, v in parts.items()] + [["TOTAL per call step", total, ""]]
    rows += [[k, v, "no (context)"] for k, v in context.items()]
    _common.print_table(["part", "us per step", "in total"], rows)
    met = total < TARGET_US
    print(f"\nstore batch: {batch} episodes, {steps} steps")
    print(f"total {total:.1f} us per step (target < {TARGET_US:.0f} us: {'met' if met else 'NOT met'})")
    _common.write_result("step_overhead", args, {
        "parts_us": parts, "total_us": total, "context_us": context, "store_batch_episodes": batch,
        "store_batch_steps": steps, "iterations": n, "repeats": REPEATS,
        "target": {"metric": "sum of parts, us per step", "max": TARGET_US, "value": total, "met": met}}, started)


if __name__ == "__main__":
    main()
