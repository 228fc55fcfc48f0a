"""Cost of one training iteration as items per iteration (K) and group size (G) grow.

    .venv/bin/python benchmarks/scaling.py [--small]

One iteration is what maestro_core/training.py does per GRPO step, built here from the
library's parts (so that the figure does not depend on how the training loop is organised):
collect K x G episodes with the learned policy (LMPolicy with the CPU profile's decoding:
grammar-constrained, question-forwarding calls, answers among the observations, the compact
prompt, 3 turns), store them (Store.write_and_ingest) and make one GRPO step (grpo_update,
cpu_profile settings). The experts are three loopback HTTP servers (tests/openai_server.py)
answering after 20 ms; the expert-call cache is the store-backed one. Every iteration uses new
items (as training samples new prompts), so the cache helps only inside a group. Model:
build_tiny_model at hidden 128, 2 layers, with the local tokenizer.

Each (K, G) runs three iterations; the figures are those of the faster of the last two (the
cores are shared with another job; the first iteration also builds the GRPO trainer and warms
up: reported as first_total_s). Sizes: K in 4, 8, 16 at G = 8 and G in 4, 8, 16
at K = 8 (--small: K 2, 4 at G = 4). Per-episode seconds show how the cost grows: flat means
linear in K x G.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import _common

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.experts import build_experts
from maestro_core.grpo import GRPOSettings, grpo_update
from maestro_core.lm_policy import LMPolicy
from maestro_core.policy_model import build_tiny_model
from maestro_core.store import Store
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer
from tests.openai_server import OpenAIServer

LATENCY_S = 0.02
REPLIES = ("41", "42", "43")


def items(k: int, iteration: int) -> list[Item]:
    return [Item(f"it{iteration}-{i}", "bench", f"What is {i} plus {iteration}? (iteration {iteration})",
                 REPLIES[i % 3], "numeric") for i in range(k)]


def run_size(registry, k: int, g: int, home: Path) -> dict:
    settings = GRPOSettings.cpu_profile(num_generations=g)
    texts = [it.question for n in range(3) for it in items(k, n)]
    tok = train_policy_tokenizer(policy_corpus(registry, texts), extra_tokens=policy_extra_tokens(registry))
    model = build_tiny_model(tok, hidden=128, layers=2, seed=0)
    policy = LMPolicy(model, tok, registry, temperature=1.0, max_turn_tokens=12, constrained=True,
                      forward_question=True, free_input=False, answer_candidates=True, answer_on_last_turn=True)
    config = EpisodeConfig(max_turns=3, call_timeout_s=600, compact_prompt=True, max_concurrency=256)
    experts = build_experts(registry)
    rows = []
    with Store(home / f"k{k}-g{g}") as store:
        runner = EpisodeRunner(registry, experts, policy, cache=ExpertCache(store), config=config)
        for it in range(3):
            t0 = time.perf_counter()
            model.eval()
            trajs = asyncio.run(runner.run(items(k, it), group_size=g, run_id="scaling", iteration=it))
            t1 = time.perf_counter()
            store.write_and_ingest(trajs, "scaling", it, 0)
            t2 = time.perf_counter()
            model.train()
            res = grpo_update(model, tok, trajs, settings, str(home / f"out-k{k}-g{g}"))
            t3 = time.perf_counter()
            rows.append({"collect_s": t1 - t0, "store_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0,
                         "episodes": len(trajs), "calls": sum(t.n_calls for t in trajs),
                         "policy_tokens": sum(len(s.completion_ids) for t in trajs for s in t.steps),
                         "train_tokens": sum(len(t.prompt_ids) + len(t.completion_ids()) for t in trajs),
                         "params_changed": res.params_changed})
    best = min(rows[1:], key=lambda r: r["total_s"])  # the faster of the two steady iterations
    return {"items": k, "group_size": g, **best, "s_per_episode": best["total_s"] / best["episodes"],
            "first_total_s": rows[0]["total_s"], "iterations": rows}


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    if args.small:
        sizes = [(2, 4), (4, 4)]
    else:
        sizes = [(4, 8), (8, 8), (16, 8), (8, 4), (8, 16)]
    servers = [OpenAIServer(lambda m, r=r: r, latency_s=LATENCY_S) for r in REPLIES]
    for s in servers:
        s.start()
    try:
        registry = _common.http_registry({n: s.base_url for n, s in zip("abc", servers)}, max_concurrency=256)
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run_size(registry, k, g, Path(tmp)) for k, g in sizes]
    finally:
        for s in servers:
            s.stop()
    _common.print_table(
        ["K items", "G", "episodes", "calls", "collect s", "store s", "update s", "total s", "s/episode",
         "first iter s"],
        [[r["items"], r["group_size"], r["episodes"], r["calls"], r["collect_s"], r["store_s"], r["update_s"],
          r["total_s"], r["s_per_episode"], r["first_total_s"]] for r in rows])
    _common.write_result("scaling", args, {"expert_latency_s": LATENCY_S, "model": {"hidden": 128, "layers": 2},
                                           "rows": rows}, started)


if __name__ == "__main__":
    main()
