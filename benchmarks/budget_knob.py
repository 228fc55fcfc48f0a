"""The request-time cost knobs of a trained checkpoint: accuracy and cost per task on the test
split at each per-task budget (none = no budget), each decode-time price tilt (nats per cent)
and each target cost per task (the tilt calibrated on the validation split), beside the
baselines of an earlier `maestro eval --baselines` (its metrics.json). Writes a table,
budget_knob.json and budget_knob.png (docs/POLICY.md "The cost knobs"):

    .venv/bin/python benchmarks/budget_knob.py --home HOME --checkpoint best \
        --budgets none 0.02 0.005 --baselines-from docs/results/policy/metrics.json --out docs/results/budget
    .venv/bin/python benchmarks/budget_knob.py --home HOME --checkpoint best --budgets none \
        --tilts 2 3 --target-costs 0.015 0.0091 --baselines-from docs/results/policy/metrics.json --out DIR
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
    p.add_argument("--budgets", nargs="*", default=["none", "0.02", "0.005"], help="USD per task, or none")
    p.add_argument("--tilts", nargs="*", type=float, default=[],
                   help="decode-time price tilts (nats per US cent) to evaluate, without a budget")
    p.add_argument("--target-costs", nargs="*", type=float, default=[],
                   help="costs per task (USD) to aim at: the tilt is calibrated on the validation split")
    p.add_argument("--baselines-from", default=None, help="a metrics.json of `maestro eval --baselines`")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "budget")
    args = p.parse_args()

    from maestro_core.evaluation import run_evaluation
    from maestro_core.plots import cost_knob_plot

    started = time.perf_counter()
    points = []
    settings = [(f"budget-{b}", "no budget" if b == "none" else f"budget ${b}",
                 {"budget": None if b == "none" else float(b)}) for b in args.budgets]
    settings += [(f"tilt-{t:g}", f"tilt {t:g}", {"price_tilt": t}) for t in args.tilts]
    settings += [(f"target-{c:g}", f"target ${c:g}", {"target_cost": c}) for c in args.target_costs]
    for name, label, knob in settings:
        m = run_evaluation(out=args.out / name, home=args.home, checkpoint=args.checkpoint, baselines=False,
                           untrained=False, log=lambda s: None, **knob)
        pol = m["systems"]["policy"]
        points.append({"label": label, "budget": knob.get("budget"), "price_tilt": m.get("price_tilt"),
                       "target_cost": knob.get("target_cost"),
                       "accuracy": pol["accuracy"], "cost_per_task": pol["cost_per_task"],
                       "calls_per_task": pol.get("calls_per_task"), "per_benchmark": pol.get("per_benchmark")})
    base = {}
    if args.baselines_from:
        systems = json.loads(Path(args.baselines_from).read_text())["systems"]
        best = max((n for n in systems if n.startswith("expert:")), key=lambda n: systems[n]["accuracy"], default=None)
        base = {n: systems[n] for n in (*BASELINES, best) if n and n in systems}
    print(f"{'setting':>16} {'tilt':>6} {'accuracy':>9} {'cost/task $':>12}")
    for q in points:
        print(f"{q['label']:>16} {q['price_tilt'] or 0:>6.3g} {q['accuracy']:>9.3f} {q['cost_per_task']:>12.6f}")
    for n, m in base.items():
        print(f"{n:>16} {m['accuracy']:>9.3f} {m['cost_per_task']:>12.6f}")
    args.out.mkdir(parents=True, exist_ok=True)
    cost_knob_plot(points, base, args.out / "budget_knob.png",
                   title=f"Request-time cost knobs: checkpoint {args.checkpoint}, test split")
    (args.out / "budget_knob.json").write_text(json.dumps(
        {"checkpoint": args.checkpoint, "points": points,
         "baselines": {n: {k: m[k] for k in ("accuracy", "cost_per_task")} for n, m in base.items()},
         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"wrote {args.out / 'budget_knob.json'} and budget_knob.png")


if __name__ == "__main__":
    main()
