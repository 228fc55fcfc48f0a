"""Evaluation: the policy beside every baseline, on the same harness, with cost and latency.

Baselines:
- `expert:<E>@@<S>`: every compatible level-1 pair alone: one call with the question, then
  the pair's output is the answer. These results form the *pair table*: every (item, pair)
  is computed once (through the expert-call cache) and shared by all baselines below.
- `oracle`: per item, the cheapest pair that answered correctly (wrong where none did): the
  ceiling of per-query routing, and its cost floor.
- `random`: a uniformly random valid pair per item (seeded).
- `router:knn`, `router:mlp`: per-query routers over MiniLM embeddings of what the policy
  sees on its first turn, trained on train-split items labelled with their oracle pair.

`metrics.json` follows DESIGN.md section 8: one entry per system under "systems" with
accuracy, cost_per_task, calls_per_task, turns_per_task, latency_p50_s, latency_p95_s,
error_rate and per_benchmark.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from maestro_core.cache import ExpertCache
from maestro_core.comparison import paired_difference
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner, build_messages
from maestro_core.experts.base import ExpertBackend
from maestro_core.policy import EpisodeView, PolicyTurn, information_text, question_of
from maestro_core.protocol import unescape
from maestro_core.registry import Registry
from maestro_core.trajectory import Trajectory

ERROR_KINDS = ("timeout", "expert_error")


@dataclass(frozen=True)
class EvalConfig:
    split: str = field(default="test", metadata={"help": "Split to evaluate (ignored for --data files)."})
    routers: tuple[str, ...] = field(default=("knn", "mlp"), metadata={"help": "Per-query routers to train."})
    router_train_per_benchmark: int = field(default=20, metadata={
        "help": "Train-split items per benchmark used to label and train the routers."})
    seed: int = field(default=0, metadata={"help": "Seed of the random router and the router training subset."})
    episode: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(max_turns=2, call_timeout_s=1800), metadata={
        "help": "Episode settings of the single-pair runs (one call, then the answer). The call timeout is "
                "generous because all items queue on each expert at once; each expert's own timeout_s still "
                "bounds every call once it runs."})


class FixedRoutePolicy:
    """Calls `route(question)` once with the question, then answers with what came back.

    The baselines' policy: no learning, no tokens. An error observation gives 'unknown'."""

    def __init__(self, route: Callable[[str], str], checkpoint_id: str = "baseline"):
        self.route, self.checkpoint_id = route, checkpoint_id

    async def act(self, messages, view: EpisodeView) -> PolicyTurn:
        question = question_of(messages)
        if view.turn == 0:
            return PolicyTurn(f"<call>{self.route(question)}: {question}</call>")
        info = information_text(messages[-1]["content"])
        text = unescape(info).strip() if info and not info.startswith("error (") else ""
        return PolicyTurn(f"<answer>{text or 'unknown'}</answer>")

    def encode_prompt(self, messages):
        return ()

    def encode_observation(self, message):
        return ()


def level1_pairs(registry: Registry) -> list[str]:
    return [a for a in registry.grammar().actions if "/" not in a]


async def pair_table(registry: Registry, experts: Mapping[str, ExpertBackend], items: Sequence[Item], *,
                     cache: ExpertCache, run_id: str, pairs: Sequence[str] | None = None,
                     config: EpisodeConfig | None = None, concurrent_pairs: int = 3,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[Trajectory]]:
    """Run every pair on every item (one episode each). Returns pair -> trajectories in item order.

    Pairs run `concurrent_pairs` at a time: the experts are single-threaded, so an LM pair and
    an OCR pair together keep both cores busy."""
    pairs = list(pairs or level1_pairs(registry))
    out: dict[str, list[Trajectory]] = {}
    sem = asyncio.Semaphore(concurrent_pairs)
    done = 0

    async def one(k: int, pair: str) -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            runner = EpisodeRunner(registry, experts, FixedRoutePolicy(lambda q, p=pair: p), cache=cache,
                                   config=config or EvalConfig().episode)
            # iteration = the pair's index: episode ids (run, iteration, item, sample) and shards
            # are then distinct per pair
            trajs = await runner.run(items, run_id=run_id, iteration=k, chunk=0)
        out[pair] = trajs
        done += 1
        if progress:
            acc = sum(t.outcome for t in trajs) / max(1, len(trajs))
            progress(f"[{done}/{len(pairs)}] {pair}: accuracy {acc:.3f} on {len(trajs)} items "
                     f"({time.perf_counter() - t0:.1f} s, cache hits {sum(t.n_cache_hits for t in trajs)})")

    await asyncio.gather(*(one(k, p) for k, p in enumerate(pairs)))
    return {p: out[p] for p in pairs}


def oracle_choice(table: Mapping[str, Sequence[Trajectory]], i: int) -> str:
    """The cheapest pair that answered item i correctly; the cheapest pair when none did."""
    def key(p):
        t = table[p][i]
        return (-t.outcome, t.total_cost, t.total_latency_s, p)
    return min(table, key=key)


def router_text(registry: Registry, item: Item) -> str:
    """What the policy sees on its first turn about the task (the user message)."""
    return build_messages(registry, item)[1]["content"]


def select(table: Mapping[str, Sequence[Trajectory]], choices: Sequence[str]) -> list[Trajectory]:
    return [table[p][i] for i, p in enumerate(choices)]


def baseline_systems(registry: Registry, items: Sequence[Item], table: Mapping[str, Sequence[Trajectory]], *,
                     train_items: Sequence[Item] = (), train_table: Mapping[str, Sequence[Trajectory]] | None = None,
                     routers: Sequence[str] = ("knn", "mlp"), seed: int = 0,
                     embedder=None) -> dict[str, tuple[list[Trajectory], list[str]]]:
    """system name -> (one trajectory per item, the route taken per item)."""
    systems: dict[str, tuple[list[Trajectory], list[str]]] = {}
    for p in table:
        systems[f"expert:{p}"] = (list(table[p]), [p] * len(items))
    oracle = [oracle_choice(table, i) for i in range(len(items))]
    systems["oracle"] = (select(table, oracle), oracle)
    pairs = sorted(table)
    rand = [random.Random(f"{seed}:{it.id}").choice(pairs) for it in items]
    systems["random"] = (select(table, rand), rand)
    if routers and train_items and train_table:
        labelled = [(it, oracle_choice(train_table, i)) for i, it in enumerate(train_items)
                    if any(train_table[p][i].outcome > 0 for p in train_table)]
        if labelled:
            from maestro_core.routers import Embedder, train_router
            emb = embedder or Embedder()
            X = emb.encode([router_text(registry, it) for it, _ in labelled])
            Xt = emb.encode([router_text(registry, it) for it in items])
            for kind in routers:
                r = train_router(kind, X, [lab for _, lab in labelled], seed=seed)
                route = r.predict(Xt)
                systems[f"router:{kind}"] = (select(table, route), route)
    return systems


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else 0.0


REFERENCE_CALL_TOKENS = (1000, 1000)
"""(input, output) tokens of the reference call that puts token prices and per-call prices on one
scale when ranking experts by price (`expensive_experts`)."""


def expensive_experts(registry: Registry) -> frozenset[str]:
    """The registry's most expensive expert(s): the highest price of one reference call
    (REFERENCE_CALL_TOKENS; per-call price plus token prices). Ties all count; empty when every
    expert is free."""
    prices = {name: e.price.cost(*REFERENCE_CALL_TOKENS) for name, e in registry.experts.items()}
    top = max(prices.values(), default=0.0)
    return frozenset(n for n, p in prices.items() if p == top) if top > 0 else frozenset()


def call_pairs(t: Trajectory) -> list[str]:
    """The expert@@skill of every call the trajectory made (no solver), in order."""
    return [f"{s.expert}@@{s.skill}" for s in t.steps if s.action == "call" and s.expert and s.skill]


def system_metrics(trajs: Sequence[Trajectory], routes: Sequence[str] | None = None, *,
                   expensive: Collection[str] | None = None) -> dict:
    """One system's metrics. `routes` (one per trajectory) adds `routes` and `routes_per_benchmark`
    (benchmark -> expert@@skill -> calls: every call of a multi-call episode counts, an episode
    without a recorded call counts its route); `expensive` (the registry's most expensive
    experts, `expensive_experts`) adds `expensive_share`, the share of the expert calls that
    went to them."""
    n = max(1, len(trajs))
    per_bench: dict[str, list[float]] = {}
    for t in trajs:
        per_bench.setdefault(t.benchmark, []).append(t.outcome)
    lat = [t.total_latency_s for t in trajs]
    calls = [s for t in trajs for s in t.steps if s.action == "call"]
    m = {
        "accuracy": sum(t.outcome for t in trajs) / n,
        "mean_reward": sum(t.reward for t in trajs) / n,
        "cost_per_task": sum(t.total_cost for t in trajs) / n,
        "calls_per_task": sum(t.n_calls for t in trajs) / n,
        "turns_per_task": sum(len(t.steps) for t in trajs) / n,
        "latency_p50_s": _pct(lat, 50),
        "latency_p95_s": _pct(lat, 95),
        "error_rate": sum(1 for s in calls if s.error in ERROR_KINDS) / max(1, len(calls)),
        "per_benchmark": {b: sum(v) / len(v) for b, v in sorted(per_bench.items())},
        "n_items": len(trajs),
    }
    if expensive is not None:
        experts = [s.expert for s in calls if s.expert]
        m["expensive_share"] = sum(1 for e in experts if e in expensive) / len(experts) if experts else 0.0
    if routes is not None:
        counts: dict[str, int] = {}
        for r in routes:
            counts[r] = counts.get(r, 0) + 1
        m["routes"] = dict(sorted(counts.items()))
        per_b: dict[str, dict[str, int]] = {}
        for t, r in zip(trajs, routes):
            row = per_b.setdefault(t.benchmark, {})
            for pair in call_pairs(t) or [r or "(no call)"]:
                row[pair] = row.get(pair, 0) + 1
        m["routes_per_benchmark"] = {b: dict(sorted(c.items())) for b, c in sorted(per_b.items())}
    return m


def write_outputs(out: Path, *, systems: Mapping[str, tuple[list[Trajectory], list[str]]], items: Sequence[Item],
                  split: str, registry: Registry, checkpoint: str, extra: Mapping | None = None) -> dict:
    """Write metrics.json, results.csv, report.md and the three plots (pareto.png,
    benchmark_accuracy.png, routing_heatmap.png) into `out`; return the metrics."""
    from maestro_core.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    metrics = {"split": split, "n_items": len(items), "registry_version": registry.version,
               "checkpoint": checkpoint, "systems": {}, **(extra or {})}
    expensive = expensive_experts(registry)
    metrics["expensive_experts"] = sorted(expensive)
    for name, (trajs, routes) in systems.items():
        metrics["systems"][name] = system_metrics(trajs, routes, expensive=expensive)
    singles = {k: v["accuracy"] for k, v in metrics["systems"].items() if k.startswith("expert:")}
    if singles and "oracle" in metrics["systems"]:
        best = max(singles, key=singles.get)
        metrics["best_single"] = {"system": best, "accuracy": singles[best]}
        metrics["oracle_gap"] = metrics["systems"]["oracle"]["accuracy"] - singles[best]
        if metrics["oracle_gap"] > 0:
            # 0 = the best single pair, 1 = the oracle (the ceiling of per-query routing)
            metrics["normalised_gain"] = {k: (v["accuracy"] - singles[best]) / metrics["oracle_gap"]
                                          for k, v in metrics["systems"].items()}
    paired = paired_comparisons(systems, items, best_single=metrics.get("best_single", {}).get("system"))
    if paired:
        metrics["paired"] = paired
    metrics["plots"] = write_plots(metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "item_id", "benchmark", "route", "prediction", "answer", "correct", "cost",
                    "latency_s", "calls", "turns", "error", "episode_id"])
        for name, (trajs, routes) in systems.items():
            for it, t, r in zip(items, trajs, routes):
                err = next((s.error for s in t.steps if s.error), "")
                w.writerow([name, it.id, it.benchmark, r, t.final_answer or "", it.answer, t.outcome,
                            f"{t.total_cost:.8f}", f"{t.total_latency_s:.4f}", t.n_calls, len(t.steps), err,
                            t.episode_id])
    (out / "report.md").write_text(format_report(metrics))
    return metrics


def paired_comparisons(systems: Mapping[str, tuple[list[Trajectory], list[str]]], items: Sequence[Item], *,
                       best_single: str | None = None, system: str = "policy") -> dict[str, dict]:
    """`system` (the policy) against each router and the best single pair on the same items
    (comparison.paired_difference: accuracy difference and cost ratio with paired bootstrap 95%
    intervals, the items only one got right, an exact McNemar p): {other: PairedDifference as a
    dict}; empty without the policy or anything to compare it with."""
    if system not in systems:
        return {}
    others = sorted(n for n in systems if n.startswith("router:")) + ([best_single] if best_single else [])

    def rows(name: str) -> dict[str, tuple[float, float]]:
        return {it.id: (t.outcome, t.total_cost) for it, t in zip(items, systems[name][0])}

    mine = rows(system)
    return {o: paired_difference(mine, rows(o), system_a=system, system_b=o).as_dict() for o in others}


def format_report(metrics: Mapping) -> str:
    benches = sorted({b for s in metrics["systems"].values() for b in s["per_benchmark"]})
    gains = metrics.get("normalised_gain", {})

    def opt(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"# Evaluation: split {metrics['split']}, {metrics['n_items']} items",
             f"registry {metrics['registry_version']}, checkpoint {metrics['checkpoint']}", "",
             "| system | accuracy | norm. gain | cost/task $ | calls/task | expensive share | latency p50 s | p95 s "
             "| errors | " + " | ".join(benches) + " |",
             "|---" * (9 + len(benches)) + "|"]
    order = sorted(metrics["systems"].items(), key=lambda kv: -kv[1]["accuracy"])
    for name, m in order:
        lines.append(f"| {name} | {m['accuracy']:.3f} | {opt(gains.get(name), '.3f')} | {m['cost_per_task']:.6f} | "
                     f"{m['calls_per_task']:.2f} | {opt(m.get('expensive_share'), '.3f')} | "
                     f"{m['latency_p50_s']:.3f} | {m['latency_p95_s']:.3f} | {m['error_rate']:.3f} | "
                     + " | ".join(f"{m['per_benchmark'].get(b, float('nan')):.2f}" for b in benches) + " |")
    if metrics.get("paired"):
        lines += ["", "Paired on the same items (95% bootstrap intervals over the items; McNemar p on the items only "
                  "one system got right):", "",
                  "| policy vs | accuracy diff (interval) | cost ratio (interval) | only policy / only other right "
                  "| McNemar p | as accurate at no higher cost |", "|---" * 6 + "|"]
        for name, d in metrics["paired"].items():
            (alo, ahi), (rlo, rhi) = d["accuracy_ci"], d["cost_ratio_ci"]
            verdict = "yes" if d["accuracy_diff"] >= -1e-12 and d["cost_a"] <= d["cost_b"] + 1e-12 else "no"
            if verdict == "no" and alo <= 0 <= ahi and rlo <= 1 <= rhi:
                verdict = "no; a tie within both intervals"
            lines.append(f"| {name} | {d['accuracy_diff']:+.3f} ({alo:+.3f} to {ahi:+.3f}) | {d['cost_ratio']:.2f} "
                         f"({rlo:.2f} to {rhi:.2f}) | {d['only_a']} / {d['only_b']} | {d['mcnemar_p']:.3f} | "
                         f"{verdict} |")
    notes = []
    if "best_single" in metrics:
        notes.append(f"Best single pair: {metrics['best_single']['system']} "
                     f"({metrics['best_single']['accuracy']:.3f}); oracle - best single = {metrics['oracle_gap']:.3f}")
    if gains:
        notes.append("norm. gain: (accuracy - best single) / (oracle - best single): 0 = the best single pair, "
                     "1 = the oracle.")
    if metrics.get("expensive_experts"):
        notes.append(f"expensive share: share of the expert calls that went to the registry's most expensive "
                     f"expert ({', '.join(metrics['expensive_experts'])}).")
    if metrics.get("plots"):
        notes.append("Plots: " + ", ".join(f"[{p}]({p})" for p in metrics["plots"]))
    if notes:
        lines += [""] + [x for note in notes for x in (note, "")][:-1]
    return "\n".join(lines) + "\n"


def policy_route(t: Trajectory) -> str:
    """A multi-step route as one label: the calls' expert@@skill joined by ' > ', or 'answer'."""
    calls = [f"{s.expert}@@{s.skill}" for s in t.steps if s.action == "call" and s.expert]
    return " > ".join(calls) if calls else "answer"


def checkpoint_episode_config(meta: Mapping, *, budget: float | None = None) -> EpisodeConfig:
    """The episode settings a checkpoint was trained with (turn limit, compact prompt, cost
    scale), with a request-time cost budget per episode when given."""
    from maestro_core.rewards import RewardConfig

    cfg = meta.get("config", {})
    return EpisodeConfig(max_turns=int(cfg.get("max_turns", 4)), call_timeout_s=1800, cost_budget=budget,
                         compact_prompt=bool(cfg.get("compact_prompt", True)),
                         reward=RewardConfig(cost_scale=float(cfg.get("cost_scale", 0.05))))


async def policy_runs(registry: Registry, experts: Mapping[str, ExpertBackend], items: Sequence[Item], path, *,
                      cache: ExpertCache, run_id: str, iteration: int, cost_lambda: float | None = None,
                      budget: float | None = None, price_tilt: float = 0.0, policy=None,
                      unseen_cost_weight: bool = False,
                      progress: Callable[[str], None] | None = None) -> tuple[list[Trajectory], list[str]]:
    """The greedy policy of the checkpoint at `path` on every item (one episode each), with the
    cost weight `cost_lambda` shown in its prompt when given, a per-episode cost `budget`
    (the user message states it; the grammar offers only the calls it can pay for) and a
    decode-time `price_tilt` (LMPolicy.price_tilt): the request-time cost knobs. `policy`: that
    checkpoint's greedy policy already loaded (its own price_tilt then applies).
    `unseen_cost_weight`: show `cost_lambda` even to a policy trained without a weight."""
    from maestro_core.checkpoints import load_checkpoint_policy, read_meta

    t0 = time.perf_counter()
    if policy is None:
        policy = load_checkpoint_policy(path, registry, temperature=0.0, price_tilt=price_tilt)
    meta = read_meta(path)
    from maestro_core.training import request_cost_lambda

    cost_lambda = request_cost_lambda(meta.get("config", {}), cost_lambda, checkpoint=str(path),
                                      unseen_ok=unseen_cost_weight)
    runner = EpisodeRunner(registry, experts, policy, cache=cache, config=checkpoint_episode_config(meta, budget=budget))
    trajs = await runner.run(list(items), run_id=run_id, iteration=iteration, cost_lambda=cost_lambda)
    if progress:
        acc = sum(t.outcome for t in trajs) / max(1, len(trajs))
        progress(f"policy {policy.checkpoint_id}: accuracy {acc:.3f} on {len(trajs)} items "
                 f"({time.perf_counter() - t0:.1f} s)")
    return trajs, [policy_route(t) for t in trajs]


async def calibrate_price_tilt(registry: Registry, experts: Mapping[str, ExpertBackend], items: Sequence[Item], path,
                               *, cache: ExpertCache, target_cost: float, budget: float | None = None,
                               cost_lambda: float | None = None, unseen_cost_weight: bool = False,
                               steps: int = 8, max_tilt: float = 1024.0,
                               progress: Callable[[str], None] | None = None) -> tuple[float, list[dict]]:
    """The smallest decode-time price tilt (LMPolicy.price_tilt, nats per cent) at which the
    greedy policy of the checkpoint at `path` spends at most `target_cost` per task on `items`
    (the validation split: the test items are never looked at), found by doubling then
    bisecting (`steps` halvings; the cost of a greedy policy only falls as the tilt grows).
    `budget` and `cost_lambda` (with `unseen_cost_weight`, as in policy_runs) are applied as
    they will be in the evaluation, so the tilt is calibrated for the same prompts. Returns the
    tilt and each tried point {price_tilt, accuracy, cost_per_task}."""
    from maestro_core.checkpoints import load_checkpoint_policy
    from maestro_core.errors import ConfigError

    if not target_cost > 0:
        raise ConfigError(f"target cost {target_cost} is not positive.", field="--target-cost",
                          fix="pass a cost per task in USD, e.g. 0.01.")
    if not items:
        raise ConfigError("no validation items to calibrate the price tilt on.", field="--target-cost",
                          fix="build the suite (maestro build-dataset): its val split calibrates the tilt.")
    tried: list[dict] = []
    policy = load_checkpoint_policy(path, registry, temperature=0.0)  # loaded once; each point sets its tilt

    async def point(tilt: float) -> dict:
        policy.price_tilt = tilt
        trajs, _ = await policy_runs(registry, experts, items, path, cache=cache, run_id="calibration", iteration=0,
                                     budget=budget, cost_lambda=cost_lambda, unseen_cost_weight=unseen_cost_weight,
                                     policy=policy)
        n = len(trajs)
        p = {"price_tilt": tilt, "accuracy": sum(t.outcome for t in trajs) / n,
             "cost_per_task": sum(t.total_cost for t in trajs) / n}
        tried.append(p)
        if progress:
            progress(f"calibration: tilt {tilt:g} -> validation accuracy {p['accuracy']:.3f}, "
                     f"cost ${p['cost_per_task']:.5f} per task (target ${target_cost:g})")
        return p

    if (await point(0.0))["cost_per_task"] <= target_cost:
        return 0.0, tried
    lo, hi = 0.0, 1.0
    while (await point(hi))["cost_per_task"] > target_cost:
        lo, hi = hi, hi * 2
        if hi > max_tilt:
            raise ConfigError(f"even a price tilt of {lo:g} costs ${tried[-1]['cost_per_task']:.5f} per task on "
                              f"validation, above the target ${target_cost:g}.", field="--target-cost",
                              fix="raise the target: the policy's cheapest routes cost about "
                                  f"${tried[-1]['cost_per_task']:.5f} per task.")
    for _ in range(steps):
        mid = (lo + hi) / 2
        if (await point(mid))["cost_per_task"] <= target_cost:
            hi = mid
        else:
            lo = mid
    return hi, tried


def run_evaluation(*, out: str | Path, registry_path: str | Path | None = None, home: str | Path | None = None,
                   split: str = "test", data: str | Path | None = None, checkpoint: str = "none",
                   baselines: bool = True, config: EvalConfig | None = None, cost_lambda: float | None = None,
                   budget: float | None = None, price_tilt: float = 0.0, target_cost: float | None = None,
                   untrained: bool = True, unseen_cost_weight: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """`maestro eval`: evaluate on the suite's split (built when missing) or a JSONL file.

    `checkpoint` (none, latest, best, RUN/ckpt-N or a folder) adds the system `policy` (greedy)
    and, when the run's initial weights exist, `policy_untrained`; `cost_lambda` is shown to
    the policy in its prompt (steering it toward cheaper routes at request time), `budget` caps
    each task's cost and `price_tilt` lowers the logits of dearer calls while decoding (the
    three request-time cost knobs; the untrained policy gets the same). `target_cost` (USD per
    task) sets `price_tilt` to the smallest tilt whose validation cost meets it
    (calibrate_price_tilt on the suite's val split), before the evaluation. A `cost_lambda` for
    a checkpoint trained without a weight in its prompts is refused unless `unseen_cost_weight`."""

    from maestro_core.dataset import load_jsonl
    from maestro_core.errors import ConfigError
    from maestro_core.experts import build_experts
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.suite import ensure_suite, load_suite

    from maestro_core.checkpoints import resolve_checkpoint, untrained_of

    config = config or EvalConfig(split=split)
    if checkpoint in ("none", "") and not baselines:
        raise ConfigError("nothing to evaluate: no checkpoint and no baselines.", field="--baselines",
                          fix="pass --baselines, or --checkpoint latest|best|PATH.")
    registry = load_registry(registry_path or DEFAULT_REGISTRY)
    with Store(home) as store:
        store.record_registry(registry)
        ck_path = resolve_checkpoint(checkpoint, home=store.home, objects=store.objects)
        ck_untrained = untrained_of(ck_path, home=store.home, objects=store.objects) if ck_path and untrained else None
        if ck_path is not None:
            log(f"policy checkpoint {ck_path}" + (f" (untrained: {ck_untrained})" if ck_untrained else ""))
        if data is not None:
            items = load_jsonl(data, quarantine=lambda where, why: store.record_quarantine(str(data), where, why))
            split = "data"
            suite = []
            if baselines and config.routers:
                # routers learn on the suite's train split, as for the suite's own splits: a held-out
                # file (maestro build-dataset --heldout) then compares them with the policy
                try:
                    suite = load_suite(store.home, object_store=store.objects)
                    log("routers: trained on the Maestro-Mini train split of this home")
                except ConfigError:
                    log("routers skipped: no Maestro-Mini suite in this home to train them on "
                        "(run `maestro build-dataset` first to include them)")
        else:
            suite = ensure_suite(store, log=log)
            items = [it for it in suite if it.split == split]
            if not items:
                raise ConfigError(f"the suite has no '{split}' items.", field="--split", fix="use train, val or test.")
        if target_cost is not None:
            if price_tilt:
                raise ConfigError("--target-cost sets the price tilt itself; --price-tilt was given too.",
                                  field="--price-tilt", fix="pass one of --price-tilt and --target-cost.")
            if ck_path is None:
                raise ConfigError("--target-cost calibrates a policy's price tilt; no checkpoint was given.",
                                  field="--checkpoint", fix="pass --checkpoint best|latest|RUN/ckpt-N|DIR.")
            val_items = [it for it in (suite or ensure_suite(store, log=log)) if it.split == "val"]
        if ck_path is not None and cost_lambda is not None:  # refused before any expert runs
            from maestro_core.checkpoints import read_meta
            from maestro_core.training import request_cost_lambda

            request_cost_lambda(read_meta(ck_path).get("config", {}), cost_lambda, checkpoint=str(ck_path),
                                unseen_ok=unseen_cost_weight)
        rng = random.Random(config.seed)
        by_bench: dict[str, list[Item]] = {}
        for it in suite:
            if it.split == "train":
                by_bench.setdefault(it.benchmark, []).append(it)
        train = [it for b in sorted(by_bench) for it in
                 rng.sample(by_bench[b], min(config.router_train_per_benchmark, len(by_bench[b])))]
        if not baselines:
            train = []
        run_id = f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        store.record_run(run_id, "eval", {"split": split, "data": str(data) if data else None,
                                          "checkpoint": str(ck_path or checkpoint), "cost_lambda": cost_lambda,
                                          "budget": budget, "price_tilt": price_tilt,
                                          "target_cost": target_cost, "n_items": len(items)}, registry.version)
        cache = ExpertCache(store)
        experts = build_experts(registry)
        pairs = level1_pairs(registry)
        if baselines:
            log(f"evaluating {len(items)} items x {len(pairs)} expert@@skill pairs "
                f"(+ {len(train)} train items for the routers); every call goes through the cache")
        policies = {name: p for name, p in (("policy", ck_path), ("policy_untrained", ck_untrained)) if p}

        calibration: list[dict] = []

        async def tables():
            nonlocal price_tilt, calibration
            try:
                if target_cost is not None:
                    price_tilt, calibration = await calibrate_price_tilt(
                        registry, experts, val_items, ck_path, cache=cache, target_cost=target_cost, budget=budget,
                        cost_lambda=cost_lambda, unseen_cost_weight=unseen_cost_weight, progress=log)
                    log(f"price tilt {price_tilt:g} (nats per cent): the smallest whose validation cost per task "
                        f"is at most ${target_cost:g}")
                t, tt = {}, None
                if baselines:
                    t = await pair_table(registry, experts, items, cache=cache, run_id=run_id,
                                         config=config.episode, progress=log)
                    if train and config.routers:
                        log("router training labels (train split):")
                        tt = await pair_table(registry, experts, train, cache=cache, run_id=run_id + "-train",
                                              config=config.episode, progress=log)
                # policy episodes take iterations after the pairs': episode ids stay distinct
                pol = {name: await policy_runs(registry, experts, items, p, cache=cache, run_id=run_id,
                                               iteration=len(pairs) + k, cost_lambda=cost_lambda, budget=budget,
                                               price_tilt=price_tilt, unseen_cost_weight=unseen_cost_weight,
                                               progress=log)
                       for k, (name, p) in enumerate(policies.items())}
                return t, tt, pol
            finally:
                for e in experts.values():
                    await e.aclose()

        table, train_table, pol = asyncio.run(tables())
        cache.flush()
        for k, pair in enumerate(table):
            store.write_and_ingest(table[pair], run_id, k, 0)
        for k, name in enumerate(pol):
            store.write_and_ingest(pol[name][0], run_id, len(pairs) + k, 0)
        systems = dict(pol)
        if baselines:
            systems.update(baseline_systems(registry, items, table, train_items=train, train_table=train_table,
                                            routers=config.routers, seed=config.seed))
        metrics = write_outputs(Path(out), systems=systems, items=items, split=split, registry=registry,
                                checkpoint=str(ck_path or checkpoint),
                                extra={"run_id": run_id, "cost_lambda": cost_lambda, "budget": budget,
                                       **({"unseen_cost_weight": True} if unseen_cost_weight else {}),
                                       "price_tilt": price_tilt, "target_cost": target_cost,
                                       **({"calibration": calibration} if calibration else {})})
        for name, m in metrics["systems"].items():
            store.record_eval(run_id, name, split, "all", m)
        store.set_run_status(run_id, "completed")
    log(format_report(metrics))
    return metrics
