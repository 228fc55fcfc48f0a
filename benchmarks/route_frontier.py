"""The routing frontier by question template beside the systems of one evaluation: the best
accuracy any routing that sees only the benchmark and the question's wording can reach at
each cost per task, fitted on the evaluated items themselves (maestro_core/frontier.py), and
where the policy and the per-query routers sit against it (docs/POLICY.md). Reads the pair
table that `maestro eval --baselines` stored; runs no expert.

    .venv/bin/python benchmarks/route_frontier.py --home HOME --metrics docs/results/policy/metrics.json \
        --out docs/results/frontier

With `--cascades 0.3 0.5 0.7 0.9` the routes also include two-call cascades (call a pair, and
a dearer one when the first reports a confidence under the threshold; frontier.cascade_table),
which a step-level policy can take and a per-query router cannot; the outputs are then named
frontier-cascades.json / .png. `--rewards LAMBDA PAIR...` also prints, per benchmark, the mean
training reward per episode (outcome - LAMBDA x cost / $0.05) of those pairs and of the
cascades between them (frontier.route_rewards), e.g. `--cascades 0.3 --rewards 1.1
tesseract@@chart rapidocr@@chart`. `--reward-optimal 0.7 1.1 1.4` prints, for each cost weight,
the routing by template that maximises that weight's mean training reward (with the cascades
when --cascades is given; frontier.reward_optimal_routes) and its accuracy and cost: where a
run at that weight would land if it learned its reward's optimum. `--splits router:mlp router:knn`
asks, for each named system of the evaluation (its routes from the results.csv beside
--metrics), whether it splits a template's items between routes on a cue or as a mix: its
right answers there against the same routes shuffled among the template's items
(frontier.split_gain).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402,F401  (environment defaults)

SYSTEMS = ("policy", "router:mlp", "router:knn", "oracle")
_QUESTION = re.compile(r"Question: ([^\n]*)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--home", required=True, help="the home where the evaluation ran (its DuckDB holds the pair table)")
    p.add_argument("--metrics", type=Path, required=True, help="that evaluation's metrics.json (names its run)")
    p.add_argument("--caps", nargs="+", type=float, default=None,
                   help="costs per task (USD) to solve at; default: a grid plus each system's own cost")
    p.add_argument("--pairs-under", type=float, default=None,
                   help="keep only the pairs whose every call cost at most this (USD): the routing a per-task budget "
                        "of that size allows")
    p.add_argument("--cascades", nargs="+", type=float, default=None, metavar="CONFIDENCE",
                   help="also route by two-call cascades that escalate below these confidences (e.g. 0.3 0.5 0.7 0.9)")
    p.add_argument("--rewards", nargs="+", default=None, metavar="LAMBDA_OR_PAIR",
                   help="a cost weight then pairs: print each benchmark's mean reward per episode of those pairs and "
                        "of the cascades between them")
    p.add_argument("--reward-optimal", nargs="+", type=float, default=None, metavar="LAMBDA",
                   help="cost weights: print the reward-maximising routing by template at each, and what it scores")
    p.add_argument("--score-routes", type=Path, default=None, metavar="FRONTIER_JSON",
                   help="a frontier.json written with --reward-optimal (on another split): score its routings here")
    p.add_argument("--splits", nargs="+", default=None, metavar="SYSTEM",
                   help="systems of the evaluation (e.g. router:mlp): is their split of a template's items between "
                        "routes better than the same routes shuffled?")
    p.add_argument("--shuffles", type=int, default=10000, help="draws per template for --splits")
    p.add_argument("--template-words", type=int, default=6, metavar="N",
                   help="words of the question that name its template (frontier.question_template; default 6)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "frontier")
    args = p.parse_args()

    from maestro_core.frontier import (cascade_table, load_pair_table, question_template, reward_optimal_routes,
                                       route_rewards, score_routing, split_gain, template_frontier)
    from maestro_core.errors import ConfigError
    from maestro_core.plots import cost_knob_plot
    from maestro_core.store import Store

    started = time.perf_counter()
    metrics = json.loads(args.metrics.read_text())
    run = metrics["run_id"]
    with Store(args.home) as store:
        table = load_pair_table(store, run)
    if args.pairs_under is not None:
        table = {p: t for p, t in table.items() if max(x.total_cost for x in t) <= args.pairs_under}
        print(f"pairs whose calls cost at most ${args.pairs_under:g}: {sorted(table)}")
    first = next(iter(table.values()))
    routes = dict(table)
    if args.cascades:
        routes.update(cascade_table(table, args.cascades))
        print(f"{len(routes) - len(table)} two-call cascades at confidences {args.cascades}")
    if args.template_words < 1:
        p.error(f"--template-words {args.template_words}: use 1 or more (default 6).")
    templates = [question_template(t.benchmark, _QUESTION.search(t.prompt_text).group(1), words=args.template_words)
                 for t in first]
    if args.rewards:
        try:
            lam, pairs = float(args.rewards[0]), args.rewards[1:]
        except ValueError:
            p.error(f"--rewards starts with the cost weight, e.g. --rewards 1.1 {' '.join(args.rewards)}.")
        unknown = sorted(set(pairs) - set(table))
        if unknown:
            p.error(f"--rewards names pairs the table lacks: {unknown}; it has {sorted(table)}.")
        chosen = {q: table[q] for q in pairs}
        chosen.update(cascade_table(chosen, args.cascades) if args.cascades else {})
        print(f"mean reward per episode at cost weight {lam:g} (outcome - {lam:g} x cost / $0.05):")
        for bench, by_route in route_rewards(chosen, [t.benchmark for t in first], cost_lambda=lam).items():
            print(f"  {bench}: " + ", ".join(f"{r} {v:.2f}" for r, v in by_route.items()))
    optimal = []
    if args.reward_optimal:
        print("the routing by template that maximises the mean reward at each cost weight:")
        previous: dict[str, str] = {}
        for lam in args.reward_optimal:
            o = reward_optimal_routes(routes, templates, cost_lambda=lam)
            optimal.append(o)
            moved = {t: r for t, r in o["routes"].items() if previous.get(t) != r}
            print(f"  weight {lam:g}: accuracy {o['accuracy']:.3f} at ${o['cost_per_task']:.6f}/task; "
                  + ("routes: " if not previous else "changed: ")
                  + ("; ".join(f"{t} -> {r}" for t, r in moved.items()) or "none"))
            previous = o["routes"]
    scored = []
    if args.score_routes:
        try:
            chosen = json.loads(args.score_routes.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--score-routes {args.score_routes}: {e}; pass a frontier.json this script wrote.")
        if not chosen.get("reward_optimal"):
            p.error(f"{args.score_routes} has no reward_optimal routings: write it with --reward-optimal.")
        print(f"the reward-optimal routings of {args.score_routes} (chosen on its {chosen.get('split')} items) "
              f"scored on these {len(first)} items:")
        for o in chosen["reward_optimal"]:
            try:
                got = score_routing(routes, templates, o["routes"])
            except ConfigError as e:
                p.error(str(e))
            scored.append({"cost_lambda": o["cost_lambda"], "chosen_on": chosen.get("split"),
                           "there": {k: o[k] for k in ("accuracy", "cost_per_task")}, **got})
            print(f"  weight {o['cost_lambda']:g}: {got['accuracy']:.3f} at ${got['cost_per_task']:.6f}/task "
                  f"(there {o['accuracy']:.3f} at ${o['cost_per_task']:.6f})"
                  + (f"; templates it lacks, routed as their benchmark's most common route: {got['unseen']}"
                     if got["unseen"] else ""))
    splits = {}
    if args.splits:
        results = args.metrics.parent / "results.csv"
        try:
            with results.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            p.error(f"--splits reads {results} beside --metrics: {e}.")
        for name in args.splits:
            took = {r["item_id"]: r["route"] for r in rows if r["system"] == name}
            missing = [t.item_id for t in first if t.item_id not in took]
            if missing:
                have = sorted({r["system"] for r in rows})
                p.error(f"--splits {name}: {results} has no route for {len(missing)} of the {len(first)} items "
                        f"(e.g. {missing[0]}); its systems are {have}.")
            try:
                got = split_gain(routes, templates, [took[t.item_id] for t in first], shuffles=args.shuffles)
            except ConfigError as e:
                p.error(str(e))
            splits[name] = got
            tot = got["total"]
            print(f"{name}: split {tot['templates']} templates ({tot['n']} items): {tot['correct']:g} right, "
                  f"{tot['expected']:.1f} with its routes shuffled within each template (p {tot['p']:.3f}); "
                  f"not split: {len(got['skipped'])} templates ("
                  + ", ".join(f"{k} {why}" for why, k in sorted(Counter(got["skipped"].values()).items())) + ")")
            for g, o in got["templates"].items():
                print(f"  {g}: {o['n']} items, routes {o['routes']}: {o['correct']:g} right, shuffled "
                      f"{o['expected']:.1f} (p {o['p']:.3f}); each route alone {o['each_route_alone']}")
    systems = {n: metrics["systems"][n] for n in SYSTEMS if n in metrics["systems"]}
    caps = args.caps or sorted({0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02, 0.025, 0.03,
                                *(round(m["cost_per_task"], 6) for m in systems.values())})
    points = template_frontier(routes, templates, caps)
    print(f"{len(first)} items, {len(set(templates))} question templates, {len(table)} pairs (run {run})")
    print(f"{'cap $/task':>11} {'accuracy':>9} {'cost/task $':>12}")
    for q in points:
        if q["accuracy"] is not None:
            print(f"{q['cap']:>11.6f} {q['accuracy']:>9.3f} {q['cost_per_task']:>12.6f}")
    print("systems of the evaluation, and the frontier at their cost:")
    at = {q["cap"]: q for q in points}
    for n, m in systems.items():
        f = at.get(round(m["cost_per_task"], 6))
        there = (f"{f['accuracy']:.3f}" if f and f["accuracy"] is not None
                 else "none under that cost" if f else "not computed (add its cost to --caps)")
        print(f"{n:>11} {m['accuracy']:>9.3f} {m['cost_per_task']:>12.6f}   frontier there: {there}")
    args.out.mkdir(parents=True, exist_ok=True)
    shown = [dict(q, label="") for q in points if q["accuracy"] is not None]
    stem, more = "frontier", None
    if args.cascades:  # beside the single-pair frontier
        stem = "frontier-cascades"
        more = {"one pair per template": [q for q in template_frontier(table, templates, caps)
                                          if q["accuracy"] is not None]}
    cost_knob_plot(shown, systems, args.out / f"{stem}.png", more_curves=more,
                   curve_label="best routing by question template" + (" with two-call cascades" if more else ""),
                   title=f"Routing by question template (fitted on the {metrics.get('split')} items) vs the systems")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"run_id": run, "split": metrics.get("split"), "n_items": len(first), "pairs": sorted(table),
         "pairs_under": args.pairs_under, "cascades": args.cascades, "templates": sorted(set(templates)),
         "points": points, "reward_optimal": optimal, "scored_routes": scored, "splits": splits,
         "systems": {n: {k: m[k] for k in ("accuracy", "cost_per_task")} for n, m in systems.items()},
         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"wrote {args.out / stem}.json and {stem}.png ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
