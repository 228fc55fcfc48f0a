"""Paired comparison of one system against others on the same items, from `maestro eval`'s
results.csv files: accuracy difference and cost ratio with bootstrap confidence intervals, and
the items only one of the two got right with an exact McNemar p-value
(maestro_core/comparison.py). Runs no model.

    .venv/bin/python benchmarks/compare_systems.py \
        --system OUT/results.csv policy \
        --system docs/results/cost/baselines-N3/results.csv router:mlp \
        --system docs/results/cost/baselines-N3/results.csv router:knn --out DIR

The first --system is A; each later one is a B. With `--baselines K` the last K are the Bs and
each earlier one is an A (several checkpoints against the routers in one table). Writes
DIR/compare.json and DIR/compare.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402,F401  (environment defaults)


def table(diffs) -> str:
    lines = ["| A | B | n | accuracy A | accuracy B | A - B (CI) | cost A $ | cost B $ | A / B cost (CI) "
             "| only A right | only B right | McNemar p |", "|" + "---|" * 12]
    for d in diffs:
        pct = f"{round(d.level * 100)}%"
        lines.append(
            f"| {d.system_a} | {d.system_b} | {d.n} | {d.accuracy_a:.3f} | {d.accuracy_b:.3f} "
            f"| {d.accuracy_diff:+.3f} ({pct}: {d.accuracy_ci[0]:+.3f} to {d.accuracy_ci[1]:+.3f}) "
            f"| {d.cost_a:.5f} | {d.cost_b:.5f} "
            f"| {d.cost_ratio:.3f} ({pct}: {d.cost_ratio_ci[0]:.3f} to {d.cost_ratio_ci[1]:.3f}) "
            f"| {d.only_a} | {d.only_b} | {d.mcnemar_p:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--system", nargs=2, action="append", metavar=("RESULTS_CSV", "SYSTEM"), required=True,
                   help="a results.csv and a system in it; the first is compared against each later one")
    p.add_argument("--label", action="append", default=None,
                   help="a name per --system for the table (default: the system name; give one per --system)")
    p.add_argument("--baselines", type=int, default=None,
                   help="how many of the last --system entries are the Bs (default: all but the first)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compare")
    args = p.parse_args(argv)

    from maestro_core.comparison import paired_difference, system_rows
    from maestro_core.errors import ConfigError

    if len(args.system) < 2:
        p.error("give at least two --system: A, then one or more to compare it with.")
    if args.label and len(args.label) != len(args.system):
        p.error(f"{len(args.label)} --label for {len(args.system)} --system: give one per --system, or none.")
    labels = args.label or [name for _, name in args.system]
    k = len(args.system) - 1 if args.baselines is None else args.baselines
    if not 1 <= k < len(args.system):
        p.error(f"--baselines {k} must leave at least one A and one B of the {len(args.system)} --system entries.")
    started = time.perf_counter()
    try:
        files: dict[str, list[dict]] = {}  # each results.csv read once, however many systems it gives
        for path, _ in args.system:
            if path not in files:
                with open(path, newline="") as f:
                    files[path] = list(csv.DictReader(f))
        loaded = [system_rows(files[path], name) for path, name in args.system]
        split = len(loaded) - k
        diffs = [paired_difference(mine, other, system_a=name, system_b=label, resamples=args.resamples,
                                   level=args.level, seed=args.seed)
                 for mine, name in zip(loaded[:split], labels[:split])
                 for other, label in zip(loaded[split:], labels[split:])]
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = table(diffs)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(md + "\n")
    (args.out / "compare.json").write_text(json.dumps({
        "systems": [{"results": path, "system": name, "label": label}
                    for (path, name), label in zip(args.system, labels)],
        "comparisons": [d.as_dict() for d in diffs], "baselines": k,
        "command": " ".join(["benchmarks/compare_systems.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": round(time.perf_counter() - started, 2)}, indent=2) + "\n")
    print(f"wrote {args.out / 'compare.json'} and compare.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
