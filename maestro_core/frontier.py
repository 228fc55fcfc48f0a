"""The routing frontier by question template: the best accuracy that any routing which sees
only the benchmark and the wording of the question (not the item's image or its particular
names and numbers) can reach at a given cost per task, from an evaluation's pair table.

A policy or router that routes by the question's template cannot beat this curve on the same
items; a point above it needs per-item cues. It is computed on the evaluated items
themselves (an upper bound, fitted on the split it scores), by dynamic programming over the
templates with costs rounded to `unit`.

    templates = [question_template(it.benchmark, it.question) for it in items]
    points = template_frontier(table, templates, caps=[0.005, 0.01, 0.02])

`cascade_table` adds the two-call routes a step-level policy can take and a per-query router
cannot: call a cheap pair, and call a dearer one only when the first reports a low
confidence (the confidence every expert's observation shows); the frontier over single pairs
and cascades together bounds any policy that routes by template and escalates on confidence.

`price_bias_bound` asks the same of a global request-time price: the best accuracy that one
bias per pair, added to a policy's first-call scores, reaches under a cost cap (also fitted on
the scored items, so an upper bound for any per-pair price such as the price tilt).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from maestro_core.errors import ConfigError
from maestro_core.trajectory import Trajectory

_WORD = re.compile(r"[A-Za-z]+")


def load_pair_table(store, run_id: str) -> dict[str, list[Trajectory]]:
    """The pair table that `maestro eval --baselines` stored for `run_id`: pair -> its episodes
    on every evaluated item, sorted by item id (the same order for every pair)."""
    iterations = store.query("SELECT DISTINCT iteration FROM episodes WHERE run_id = ? AND checkpoint_id = "
                             "'baseline' ORDER BY iteration", [run_id])["iteration"].to_pylist()
    table: dict[str, list[Trajectory]] = {}
    order = None
    for k in iterations:
        trajs = store.trajectories(run_id, k)
        pair = next((f"{s.expert}@@{s.skill}" for t in trajs for s in t.steps if s.expert), None)
        trajs = sorted(trajs, key=lambda t: t.item_id)
        order = order or [t.item_id for t in trajs]
        if pair is None or [t.item_id for t in trajs] != order:
            raise ConfigError(f"iteration {k} of {run_id} is not a pair of the table.", fix="pass the metrics.json "
                              "of a `maestro eval --baselines` run made in this home.")
        table[pair] = trajs
    if not table:
        raise ConfigError(f"run {run_id} has no pair table.", fix="run `maestro eval --baselines` in this home.")
    return table


def question_template(benchmark: str, question: str, *, words: int = 6) -> str:
    """`benchmark: first words` of the question's first line: its first word and the next
    lower-case words (names, numbers and symbols dropped), `words` in all; math questions,
    whose wording is the expression, are one template."""
    if benchmark == "math":
        return "math"
    found = _WORD.findall(question.split("\n")[0])
    kept = found[:1] + [w for w in found[1:] if w.islower()]
    return f"{benchmark}: {' '.join(kept[:words])}"


def template_benchmark(template: str) -> str:
    """The benchmark a `question_template` belongs to ("charts: What is the" -> "charts")."""
    return template.split(": ")[0]


def _check_items(table: Mapping[str, Sequence], n: int) -> None:
    """A ConfigError unless every route of the table has one result per item (n items)."""
    if any(len(results) != n for results in table.values()):
        raise ConfigError("every route needs one result per item.", fix="pass the pair table of one evaluation.")


def _items_by_group(table: Mapping[str, Sequence], groups: Sequence[str]) -> dict[str, list[int]]:
    """{group: indices of its items}, sorted by group (`_check_items` first)."""
    _check_items(table, len(groups))
    idx: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        idx.setdefault(g, []).append(i)
    return dict(sorted(idx.items()))


def routes_by_template(rows: Iterable[Mapping[str, str]], templates: Mapping[str, str]) -> dict[str, dict[str, dict]]:
    """Where each system of an evaluation sent each question template: {template: {system:
    {"n", "accuracy", "cost_per_task", "routes": {route: count}}}}, from the rows of
    `maestro eval`'s results.csv (system, item_id, route, correct, cost) and `templates`
    ({item_id: question_template}). A row whose item has no template is an error."""
    acc: dict[str, dict[str, dict]] = {}
    for row in rows:
        item = row["item_id"]
        if item not in templates:
            raise ConfigError(f"item {item} of the results is not among the evaluated items.",
                              fix="pass the home (or --data file) that the evaluation scored.")
        cell = acc.setdefault(templates[item], {}).setdefault(
            row["system"], {"n": 0, "correct": 0.0, "cost": 0.0, "routes": {}})
        cell["n"] += 1
        cell["correct"] += float(row["correct"] or 0)
        cell["cost"] += float(row["cost"] or 0)
        cell["routes"][row["route"]] = cell["routes"].get(row["route"], 0) + 1
    return {t: {s: {"n": c["n"], "accuracy": c["correct"] / c["n"], "cost_per_task": c["cost"] / c["n"],
                    "routes": dict(sorted(c["routes"].items(), key=lambda kv: -kv[1]))}
                for s, c in sorted(by.items())}
            for t, by in sorted(acc.items())}


@dataclass(frozen=True)
class RouteResult:
    """One route's result on one item, as a pair table's episode gives it (outcome, total_cost)."""

    outcome: float
    total_cost: float


def cascade_table(table: Mapping[str, Sequence[Trajectory]],
                  thresholds: Sequence[float] = (0.3, 0.5, 0.7, 0.9)) -> dict[str, list[RouteResult]]:
    """Two-call routes from a pair table: `A>B@t` calls pair A, answers from it when A's first
    step reports a confidence of at least t, and otherwise also calls B and answers from B (the
    cost of both). Only B dearer than A on average (escalation); a step without a confidence
    counts as 0 (always escalates). Item order is the table's."""
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ConfigError(f"thresholds {list(thresholds)} must be in (0, 1].", field="thresholds",
                          fix="use confidences such as 0.3 0.5 0.7 0.9.")
    out: dict[str, list[RouteResult]] = {}
    for a, first in sorted(table.items()):
        conf = [next((s.confidence for s in t.steps if s.expert), None) or 0.0 for t in first]
        for b, second in sorted(table.items()):
            if b == a or len(second) != len(first) or \
                    sum(y.total_cost for y in second) <= sum(x.total_cost for x in first):
                continue
            for th in thresholds:
                out[f"{a}>{b}@{th:g}"] = [RouteResult(x.outcome, x.total_cost) if c >= th
                                           else RouteResult(y.outcome, x.total_cost + y.total_cost)
                                           for x, y, c in zip(first, second, conf)]
    return out


def route_rewards(table: Mapping[str, Sequence[Trajectory | RouteResult]], groups: Sequence[str], *,
                  cost_lambda: float, cost_scale: float = 0.05) -> dict[str, dict[str, float]]:
    """Mean training reward per episode of each route (a pair, or a `cascade_table` route) on
    each group of items (benchmark or template): outcome - cost_lambda x cost / cost_scale, the
    reward of a run with that (hidden) cost weight. {group: {route: mean reward}}."""
    return {g: {r: sum(table[r][i].outcome - cost_lambda * table[r][i].total_cost / cost_scale for i in ii) / len(ii)
                for r in sorted(table)} for g, ii in _items_by_group(table, groups).items()}


def reward_optimal_routes(table: Mapping[str, Sequence[Trajectory | RouteResult]], templates: Sequence[str], *,
                          cost_lambda: float, cost_scale: float = 0.05) -> dict:
    """The routing a training run at (hidden) cost weight `cost_lambda` aims at: per template,
    the route (a pair, or a `cascade_table` route) with the highest mean reward, outcome -
    cost_lambda x cost / cost_scale (a tie goes to the cheaper route, then the first name), and
    what that routing scores: {"cost_lambda", "accuracy", "cost_per_task", "routes"}. Fitted on
    the table's own items, like `template_frontier`: the point of the frontier that this
    weight's reward prefers, which a policy that learned it perfectly would reach."""
    if not table:
        raise ConfigError("the pair table is empty.", fix="evaluate with --baselines first.")
    if cost_lambda < 0 or cost_scale <= 0:
        raise ConfigError(f"cost_lambda {cost_lambda} must be >= 0 and cost_scale {cost_scale} > 0.",
                          field="cost_lambda", fix="use e.g. cost_lambda 1.1 and cost_scale 0.05.")
    rewards = route_rewards(table, templates, cost_lambda=cost_lambda, cost_scale=cost_scale)
    routes = {}
    for g, idx in _items_by_group(table, templates).items():  # rounded: an exact tie goes to the cheaper route
        routes[g] = min(table, key=lambda r: (-round(rewards[g][r], 9), sum(table[r][i].total_cost for i in idx), r))
    scored = score_routing(table, templates, routes)
    return {"cost_lambda": cost_lambda, "accuracy": scored["accuracy"], "cost_per_task": scored["cost_per_task"],
            "routes": routes}


def score_routing(table: Mapping[str, Sequence[Trajectory | RouteResult]], templates: Sequence[str],
                  routes: Mapping[str, str]) -> dict:
    """What a routing by template (template -> route, e.g. `reward_optimal_routes` chosen on
    another split) scores on this table's items. A template the routing lacks takes the
    route it gives most templates of the same benchmark (the text before ': '), a tie going
    to the first name. {"accuracy", "cost_per_task", "unseen": {template: route used}}."""
    _check_items(table, len(templates))
    unknown = sorted(set(routes.values()) - set(table))
    if unknown:
        raise ConfigError(f"the routing names routes this table lacks: {unknown}.", field="routes",
                          fix="score it on a table with the same pairs (and --cascades, if it uses cascades).")
    by_bench: dict[str, dict[str, int]] = {}
    for t, r in routes.items():
        counts = by_bench.setdefault(template_benchmark(t), {})
        counts[r] = counts.get(r, 0) + 1
    chosen, unseen = dict(routes), {}
    for t in sorted(set(templates) - set(routes)):
        counts = by_bench.get(template_benchmark(t))
        if not counts:
            raise ConfigError(f"the routing has no route for benchmark '{template_benchmark(t)}' (template '{t}').",
                              field="routes", fix="choose the routing on a split with that benchmark.")
        chosen[t] = unseen[t] = min(counts, key=lambda r: (-counts[r], r))
    n = len(templates)
    picked = [table[chosen[t]][i] for i, t in enumerate(templates)]
    return {"accuracy": sum(x.outcome for x in picked) / n, "cost_per_task": sum(x.total_cost for x in picked) / n,
            "unseen": unseen}


def split_gain(table: Mapping[str, Sequence[Trajectory | RouteResult]], templates: Sequence[str],
               routes: Sequence[str], *, shuffles: int = 10000, seed: int = 0) -> dict:
    """Does a system that splits a template's items between routes (`routes[i]`: the route it
    took on item i, e.g. router:mlp's from results.csv) use a cue below the template, or is its
    split as good as chance? Per template where it took two or more routes, all in the table:
    the answers its routes got right there, the mean of the same count with its routes shuffled
    among the template's items (same routes, same numbers of each: `shuffles` draws), and p =
    the share of draws that got at least as many right. "total" sums those templates and
    shuffles them all at once. A gain near 0 with a large p: the split carries no cue, only a
    mix of the routes. Templates with one route, or a route the table lacks, are in "skipped"."""
    if len(routes) != len(templates):
        raise ConfigError(f"{len(routes)} routes for {len(templates)} items.", field="routes",
                          fix="give the system's route on every item of the pair table, in its order.")
    if shuffles < 1:
        raise ConfigError(f"shuffles {shuffles} must be >= 1.", field="shuffles", fix="use e.g. 10000.")
    rng = random.Random(seed)
    split, skipped = {}, {}
    for g, idx in _items_by_group(table, templates).items():
        used = [routes[i] for i in idx]
        if any(r not in table for r in used):
            skipped[g] = "a route the table lacks"
        elif len(set(used)) < 2:
            skipped[g] = "one route"
        else:
            split[g] = (idx, used)

    def right(pairs: Iterable[tuple[int, str]]) -> float:
        return sum(table[r][i].outcome for i, r in pairs)

    out: dict[str, dict] = {}
    draws_total = [0.0] * shuffles
    for g, (idx, used) in split.items():
        observed, mixed, draws = right(zip(idx, used)), list(used), []
        for k in range(shuffles):
            rng.shuffle(mixed)
            draws.append(right(zip(idx, mixed)))
            draws_total[k] += draws[-1]
        counts = Counter(used)
        out[g] = {"n": len(idx), "routes": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
                  "correct": observed, "expected": sum(draws) / shuffles,
                  "p": sum(d >= observed - 1e-9 for d in draws) / shuffles,
                  "each_route_alone": {r: right((i, r) for i in idx) for r in sorted(counts)}}
    observed = sum(o["correct"] for o in out.values())
    total = {"templates": len(out), "n": sum(o["n"] for o in out.values()), "correct": observed,
             "expected": sum(draws_total) / shuffles if out else 0.0,
             "p": sum(d >= observed - 1e-9 for d in draws_total) / shuffles if out else 1.0}
    return {"templates": out, "total": total, "skipped": skipped, "shuffles": shuffles}


def template_frontier(table: Mapping[str, Sequence[Trajectory | RouteResult]], templates: Sequence[str],
                      caps: Sequence[float], *, unit: float = 0.0001) -> list[dict]:
    """For each cap (USD per task): the template -> route choice (a pair, or a `cascade_table`
    route) with the most correct answers whose mean cost is at most the cap. Returns dicts with
    cap, accuracy, cost_per_task and routes (template -> route), in the order of `caps`."""
    if not table:
        raise ConfigError("the pair table is empty.", fix="evaluate with --baselines first.")
    n = len(templates)
    if any(len(trajs) != n for trajs in table.values()):
        raise ConfigError("every pair needs one episode per item.", fix="pass the pair table of one evaluation.")
    if unit <= 0:
        raise ConfigError("unit must be > 0.", field="unit", fix="use e.g. 0.0001.")
    groups = _items_by_group(table, templates)
    # per template and pair: (correct answers, total cost in units), without the dominated ones
    # (another route as right at no higher cost), which no optimum needs
    options = {g: _undominated([(p, sum(table[p][i].outcome for i in idx),
                                 round(sum(table[p][i].total_cost for i in idx) / unit)) for p in sorted(table)])
               for g, idx in groups.items()}
    # one pass up to the largest cap: the best route set for each exact total cost; a cap then
    # takes the best state at or under it (costs are >= 0, so a smaller cap's states are a subset)
    limit = int(max(caps, default=0.0) * n / unit + 1e-9)
    best: dict[int, tuple[float, tuple[tuple[str, str], ...]]] = {0: (0.0, ())}
    for g in sorted(options):
        nxt: dict[int, tuple[float, tuple[tuple[str, str], ...]]] = {}
        for spent, (correct, routes) in best.items():
            for p, ok, cost in options[g]:
                c = spent + cost
                if c <= limit and (c not in nxt or nxt[c][0] < correct + ok):
                    nxt[c] = (correct + ok, routes + ((g, p),))
        best = nxt
    out = []
    for cap in caps:
        cap_units = int(cap * n / unit + 1e-9)
        within = [(c, v) for c, v in best.items() if c <= cap_units]
        if not within:
            out.append({"cap": cap, "accuracy": None, "cost_per_task": None, "routes": {}})
            continue
        spent, (correct, routes) = max(within, key=lambda kv: (kv[1][0], -kv[0]))
        out.append({"cap": cap, "accuracy": correct / n, "cost_per_task": spent * unit / n, "routes": dict(routes)})
    return out


def _undominated(options: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """The options (name, correct, cost) that no other beats: cheapest first, each more
    correct than every cheaper one (on a tie in both, the first name)."""
    kept: list[tuple[str, float, int]] = []
    for o in sorted(options, key=lambda o: (o[2], -o[1], o[0])):
        if not kept or o[1] > kept[-1][1]:
            kept.append(o)
    return kept


def price_bias_bound(scores: Sequence[Sequence[float]], pairs: Sequence[str],
                     table: Mapping[str, Sequence[Trajectory]], caps: Sequence[float], *,
                     grid: Sequence[float] = (-20, -10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10, 20),
                     rounds: int = 6) -> list[dict]:
    """For each cap (USD per task): one bias per pair, subtracted from the policy's first-call
    scores (`scores[i][k]`: item i, pair `pairs[k]`), so that each item goes to its argmax,
    chosen to maximise accuracy with the mean cost at most the cap (coordinate search over
    `grid`, `rounds` passes; a pair missing from the table scores 0 at no cost). An upper bound
    on what a global per-pair price reaches on these items; a local search, so a lower bound on
    that bound. Returns dicts with cap, accuracy, cost_per_task, biases (the non-zero ones)."""
    n = len(scores)
    if any(len(trajs) != n for trajs in table.values()):
        raise ConfigError("every pair needs one episode per scored item.", fix="score the pair table's items.")
    outcome = [[table[p][i].outcome if p in table else 0.0 for p in pairs] for i in range(n)]
    cost = [[table[p][i].total_cost if p in table else 0.0 for p in pairs] for i in range(n)]

    def routed(bias):
        picks = [max(range(len(pairs)), key=lambda k: row[k] - bias[k]) for row in scores]
        return (sum(outcome[i][k] for i, k in enumerate(picks)) / n, sum(cost[i][k] for i, k in enumerate(picks)) / n)

    out = []
    for cap in caps:
        def value(bias):  # under the cap beats over it; then accuracy (under) or a lower cost (over)
            acc, c = routed(bias)
            ok = c <= cap + 1e-12
            return (ok, acc if ok else -c, -c), acc, c
        bias = [0.0] * len(pairs)
        best = value(bias)
        for _ in range(rounds):
            moved = False
            for k in range(len(pairs)):
                for g in grid:
                    trial = bias[:k] + [float(g)] + bias[k + 1:]
                    v = value(trial)
                    if v[0] > best[0]:
                        best, bias, moved = v, trial, True
            if not moved:
                break
        _, acc, c = best
        ok = c <= cap + 1e-12
        out.append({"cap": cap, "accuracy": acc if ok else None, "cost_per_task": c if ok else None,
                    "biases": {p: b for p, b in zip(pairs, bias) if b}})
    return out


def first_call_scores(policy, registry, items) -> list[list[float]]:
    """A CPU policy's first-call scores for `price_bias_bound`: log p(target | compact prompt,
    `<call>`) over its grammar's pairs (`policy.actions`, each one token), per item."""
    import torch

    from maestro_core.episode import build_messages

    tok, model = policy.tokenizer, policy.model
    ids = []
    for a in policy.actions:
        t = tok(a, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise ConfigError(f"pair {a} is {len(t)} tokens in this policy's tokenizer.", field="checkpoint",
                              fix="use a checkpoint of the CPU policy (one token per pair); the bound reads "
                                  "single-token call targets.")
        ids.append(t[0])
    call = tok("<call>", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for item in items:
            ctx = list(policy.encode_prompt(build_messages(registry, item, compact=True))) + call
            logits = model(torch.tensor([ctx], device=device)).logits[0, -1, ids]
            out.append(logits.float().log_softmax(-1).tolist())
    return out
