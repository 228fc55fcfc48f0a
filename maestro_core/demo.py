"""The foundation demo: registry -> episodes with a scripted policy -> stored trajectories.

Runs what exists end to end on the embedded default registry: items are generated from a
seed, a hand-written scripted router (no learning yet) plays each episode against the real
in-process experts, trajectories are written as a Parquet shard and loaded into DuckDB, and
the same episodes are run a second time to show the expert-call cache at work.

    python -m flows.cli demo       (what `make demo` runs)
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.policy import EpisodeView, ScriptedPolicy, information_text
from maestro_core.protocol import unescape
from maestro_core.registry import Registry, load_registry
from maestro_core.store import Store

DEMO_REGISTRY = Path(__file__).resolve().parents[1] / "registry" / "demo-tools.yaml"
_WORDS = "orchestra expert skill route answer policy reward token cache model chart digit".split()


def demo_items(n: int, seed: int = 0) -> list[Item]:
    """Arithmetic and text-counting questions, generated deterministically from a seed."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if i % 2 == 0:
            a, b, op = rng.randint(2, 999), rng.randint(2, 999), rng.choice("+-*")
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            items.append(Item(f"arith-{i:04d}", "arithmetic", f"What is {a} {op} {b}?", str(answer), "numeric"))
        else:
            words = rng.sample(_WORDS, rng.randint(2, 7))
            text = " ".join(words)
            if rng.random() < 0.5:
                items.append(Item(f"count-{i:04d}", "counting", f"How many words are in '{text}'?",
                                  str(len(words)), "numeric"))
            else:
                ch = rng.choice("aeiort")
                items.append(Item(f"count-{i:04d}", "counting", f"How many times does the letter '{ch}' "
                                  f"appear in '{text}'?", str(text.count(ch)), "numeric"))
    return items


def demo_router(question: str, observations: list[str], view: EpisodeView) -> str:
    """A hand-written router: arithmetic to calc@@math, counting to counter@@text, then answer
    with what the expert returned. It reads the question only, never the answer."""
    if observations:
        info = information_text(observations[-1])
        return f"<answer>{unescape(info) if info else 'unknown'}</answer>"
    m = re.search(r"(-?\d+ [-+*] -?\d+)", question)
    if m:
        return f"<think>arithmetic: use the calculator</think><call>calc@@math: {m.group(1)}</call>"
    return f"<think>counting</think><call>counter@@text: {question}</call>"


def run_demo(*, home: str | Path | None = None, registry_path: str | Path = DEMO_REGISTRY, n_items: int = 40,
             group_size: int = 4, seed: int = 0, log=print) -> dict:
    """Run the demo and return its summary (also printed through `log`)."""
    registry: Registry = load_registry(registry_path)
    items = demo_items(n_items, seed)
    with Store(home) as store:
        store.record_registry(registry)
        run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        store.record_run(run_id, "demo", {"n_items": n_items, "group_size": group_size, "seed": seed},
                         registry.version)
        cache = ExpertCache(store)
        runner = EpisodeRunner(registry, build_experts(registry), ScriptedPolicy(demo_router), cache=cache,
                               config=EpisodeConfig())
        passes = []
        for iteration in range(2):  # the second pass replays the same episodes: every call is a cache hit
            t0 = time.perf_counter()
            trajs = asyncio.run(runner.run(items, group_size=group_size, run_id=run_id, iteration=iteration))
            wall = time.perf_counter() - t0
            key = store.write_and_ingest(trajs, run_id, iteration, chunk=0)
            calls = sum(t.n_calls for t in trajs)
            passes.append({
                "iteration": iteration, "episodes": len(trajs), "accuracy": sum(t.outcome for t in trajs) / len(trajs),
                "mean_reward": sum(t.reward for t in trajs) / len(trajs), "calls": calls,
                "cache_hits": sum(t.n_cache_hits for t in trajs), "cost": sum(t.total_cost for t in trajs),
                "expert_seconds_reported": sum(t.total_latency_s for t in trajs),
                "expert_seconds_spent": sum(t.spent_s for t in trajs), "wall_s": wall, "shard": key,
            })
        store.set_run_status(run_id, "completed")
        stored = store.count_episodes(run_id)
        summary = {"run_id": run_id, "registry": registry.name, "registry_version": registry.version,
                   "home": str(store.home), "db": str(store.db_path), "stored_episodes": stored, "passes": passes}
    log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"Maestro demo run {s['run_id']}  registry {s['registry']}@{s['registry_version']}", "",
             "| pass | episodes | accuracy | mean reward | calls | cache hits | cost $ | expert s (reported) "
             "| expert s (spent) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in s["passes"]:
        lines.append(f"| {p['iteration']} | {p['episodes']} | {p['accuracy']:.3f} | {p['mean_reward']:.3f} | "
                     f"{p['calls']} | {p['cache_hits']} | {p['cost']:.5f} | {p['expert_seconds_reported']:.3f} | "
                     f"{p['expert_seconds_spent']:.3f} | {p['wall_s']:.2f} |")
    lines += ["", f"stored episodes: {s['stored_episodes']} in {s['db']}"]
    lines += [f"shard: {p['shard']}" for p in s["passes"]]
    return "\n".join(lines)
