"""The request-time cost knob of a trained checkpoint: accuracy and cost per task on the test
split at each per-task budget (none = no budget), beside the baselines of an earlier
`maestro eval --baselines` (its metrics.json). Writes a table, budget_knob.json and
budget_knob.png (docs/POLICY.md "The cost knob"):

    .venv/bin/python benchmarks/budget_knob.py --home HOME --checkpoint best \
        --budgets none 0.02 0.005 --baselines-from docs/results/policy/metrics.json --out docs/results/budget
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402,F401  (environment defaults)

BASELINES = ("oracle", "router:mlp", "router:knn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--home", required=True, help="the home holding the suite and the training run")
    p.add_argument("--checkpoint", default="best", help="best | latest | RUN/ckpt-N | DIR")
    p.add_argument("--budgets", nargs="+", default=["none", "0.02", "0.005"], help="USD per task, or none")
    p.add_argument("--baselines-from", default=None, help="a metrics.json of `maestro eval --baselines`")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "budget")
    args = p.parse_args()

    from maestro_core.evaluation import run_evaluation
    from maestro_core.plots import cost_knob_plot

    started = time.perf_counter()
    points = []
    for b in args.budgets:
        budget = None if b == "none" else float(b)
        m = run_evaluation(out=args.out / f"budget-{b}", home=args.home, checkpoint=args.checkpoint, baselines=False,
                           untrained=False, budget=budget, log=lambda s: None)
        pol = m["systems"]["policy"]
        points.append({"label": "no budget" if budget is None else f"budget ${b}", "budget": budget,
                       "accuracy": pol["accuracy"], "cost_per_task": pol["cost_per_task"],
                       "calls_per_task": pol.get("calls_per_task"), "per_benchmark": pol.get("per_benchmark")})
    base = {}
    if args.baselines_from:
        systems = json.loads(Path(args.baselines_from).read_text())["systems"]
        best = max((n for n in systems if n.startswith("expert:")), key=lambda n: systems[n]["accuracy"], default=None)
        base = {n: systems[n] for n in (*BASELINES, best) if n and n in systems}
    print(f"{'setting':>16} {'accuracy':>9} {'cost/task $':>12}")
    for q in points:
        print(f"{q['label']:>16} {q['accuracy']:>9.3f} {q['cost_per_task']:>12.6f}")
    for n, m in base.items():
        print(f"{n:>16} {m['accuracy']:>9.3f} {m['cost_per_task']:>12.6f}")
    args.out.mkdir(parents=True, exist_ok=True)
    cost_knob_plot(points, base, args.out / "budget_knob.png",
                   title=f"Request-time budget: checkpoint {args.checkpoint}, test split")
    (args.out / "budget_knob.json").write_text(json.dumps(
        {"checkpoint": args.checkpoint, "points": points,
         "baselines": {n: {k: m[k] for k in ("accuracy", "cost_per_task")} for n, m in base.items()},
         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"wrote {args.out / 'budget_knob.json'} and budget_knob.png")


if __name__ == "__main__":
    main()
