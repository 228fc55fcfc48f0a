"""Where each system of an evaluation sends each question template: accuracy, cost per task
and route counts per (benchmark, question template) (maestro_core/frontier.py,
`routes_by_template`), read from the results.csv that `maestro eval` writes; runs no expert.
With the results of `maestro eval --baselines` it also gives every single pair's accuracy and
cost on each template (systems `expert:PAIR`).

    .venv/bin/python benchmarks/routes_by_template.py --home HOME --results OUT/results.csv \\
        [--systems policy router:mlp] [--out DIR]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--home", required=True, help="the home whose suite the evaluation scored")
    p.add_argument("--results", type=Path, required=True, help="an evaluation's results.csv")
    p.add_argument("--split", default="test", help="the suite split the evaluation scored (default: test)")
    p.add_argument("--data", type=Path, default=None, help="the --data file the evaluation scored instead of a split")
    p.add_argument("--systems", nargs="+", default=None, help="systems to show (default: all in the file)")
    p.add_argument("--out", type=Path, default=None, help="also write routes_by_template.json here")
    args = p.parse_args()

    from maestro_core.dataset import load_jsonl
    from maestro_core.frontier import question_template, routes_by_template
    from maestro_core.suite import load_suite

    if not args.results.is_file():
        p.error(f"{args.results} is not a file: pass the results.csv that `maestro eval --out DIR` wrote in DIR.")
    started = time.perf_counter()
    items = load_jsonl(args.data) if args.data else load_suite(args.home, split=args.split)
    templates = {it.id: question_template(it.benchmark, it.question) for it in items}
    with args.results.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if args.systems is None or r["system"] in args.systems]
    if not rows:
        p.error(f"no rows of {args.systems} in {args.results}: name systems from its 'system' column.")
    table = routes_by_template(rows, templates)
    for template, by in table.items():
        print(template)
        for system, cell in by.items():
            routes = ", ".join(f"{r} {n}" for r, n in cell["routes"].items())
            print(f"  {system:32s} n={cell['n']:3d} accuracy {cell['accuracy']:.2f}  "
                  f"${cell['cost_per_task']:.4f}/task  {routes}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routes_by_template.json").write_text(json.dumps(
            {"results": str(args.results), "templates": table, "seconds": round(time.perf_counter() - started, 1)},
            indent=1))
        print(f"wrote {args.out / 'routes_by_template.json'}")


if __name__ == "__main__":
    main()
