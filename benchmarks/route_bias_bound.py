"""How far a global per-pair price can move a trained policy: the best accuracy that one bias
per expert@@skill pair, subtracted from the policy's first-call scores, reaches under a cost
cap, scored and fitted on the evaluated items themselves (maestro_core/frontier.py,
`price_bias_bound`). An upper bound for the request-time price tilt (`--price-tilt`,
`--target-cost`), which is one such bias vector (the tilt x each pair's price).

    .venv/bin/python benchmarks/route_bias_bound.py --home HOME --metrics docs/results/policy/metrics.json \
        --checkpoint HOME/runs/RUN/ckpt-60 [...] --caps 0.0086 0.0091 --out DIR

The first-call scores are the policy's log-probabilities of each call target right after
`<call>` (the CPU policy's tokenizer has one token per pair), on the compact prompt it was
trained with. Each item's outcome and cost under a pair come from the pair table that
`maestro eval --baselines` stored in HOME (one call, then the answer), so the score assumes
the policy calls once and answers with what it got, which the trained CPU policy does
(calls per task 1.00). Its untilted routing, scored that way, is printed beside the bound;
it should match `maestro eval --checkpoint` on the same items.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402,F401  (environment defaults)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--home", required=True, help="the home where `maestro eval --baselines` ran (its pair table)")
    p.add_argument("--metrics", type=Path, required=True, help="that evaluation's metrics.json (names its run)")
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint folders of trained CPU policies")
    p.add_argument("--caps", nargs="+", type=float, default=[0.0086, 0.0091],
                   help="costs per task (USD) to solve at (default: the kNN and MLP routers' on the demo's test split)")
    p.add_argument("--registry", default=None, help="the registry the evaluation used (default: the embedded one)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bias_bound")
    args = p.parse_args()

    from maestro_core.checkpoints import load_checkpoint_policy
    from maestro_core.errors import ConfigError
    from maestro_core.frontier import first_call_scores, load_pair_table, price_bias_bound
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.suite import load_suite

    started = time.perf_counter()
    metrics = json.loads(args.metrics.read_text())
    registry = load_registry(args.registry or DEFAULT_REGISTRY)
    with Store(args.home) as store:
        table = load_pair_table(store, metrics["run_id"])
    order = [t.item_id for t in next(iter(table.values()))]
    by_id = {it.id: it for it in load_suite(args.home, split=metrics.get("split", "test"))}
    missing = [i for i in order if i not in by_id]
    if missing:
        raise ConfigError(f"{len(missing)} items of the pair table (e.g. {missing[0]}) are not in the home's "
                          f"{metrics.get('split')} split.", fix="pass the metrics.json of an evaluation of this "
                                                                "home's own suite (not --data).")
    items = [by_id[i] for i in order]
    rows = []
    for ckpt in args.checkpoint:
        policy = load_checkpoint_policy(ckpt, registry, device="cpu")
        scores = first_call_scores(policy, registry, items)
        pairs = list(policy.actions)
        untilted = price_bias_bound(scores, pairs, table, caps=[float("inf")], grid=(0.0,))[0]
        bounds = price_bias_bound(scores, pairs, table, caps=args.caps)
        rows.append({"checkpoint": str(ckpt), "untilted": {k: untilted[k] for k in ("accuracy", "cost_per_task")},
                     "bounds": bounds})
        print(f"{ckpt}: untilted {untilted['accuracy']:.3f} at ${untilted['cost_per_task']:.4f}; " + "; ".join(
            f"cap ${b['cap']:g}: " + (f"{b['accuracy']:.3f} at ${b['cost_per_task']:.4f}" if b["accuracy"] is not None
                                      else "none") for b in bounds), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bias_bound.json").write_text(json.dumps(
        {"run_id": metrics["run_id"], "split": metrics.get("split"), "n_items": len(items), "caps": args.caps,
         "checkpoints": rows, "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"wrote {args.out / 'bias_bound.json'} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
