"""The registry's LM experts in float32 and in bfloat16: generation time and accuracy per pair.

    .venv/bin/python benchmarks/lm_experts.py --home HOME   # the suite's test split (the figures)
    .venv/bin/python benchmarks/lm_experts.py               # 40 generated math questions
    .venv/bin/python benchmarks/lm_experts.py --small       # 4 questions, SmolLM2's math pair only
    .venv/bin/python benchmarks/lm_experts.py --home HOME --max-batch 16   # smaller batches

Every expert@@skill pair of the registry whose expert is a `transformers` LM (Maestro-Mini:
SmolLM2 and Gemma 3 on `math` and `general`) runs on every item, one episode each, through the
evaluation's own `pair_table` (two pairs at a time, a memory-only cache, so every call is
generated), once with the LMs loaded in float32 and once in bfloat16; everything else about
the registry (max_new_tokens, max_batch, prices) stays as it is, except with `--max-batch N`:
every LM then generates in batches of up to N (its max_concurrency N too). Figures per dtype: seconds
for all pairs, accuracy per pair, and how many answers differ from float32's.

Run it alone on the machine: the two dtypes run one after the other, so a job sharing the
cores skews their ratio.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DTYPES = ("float32", "bfloat16")


def lm_registry(dtype: str, max_batch: int | None = None):
    """The default registry with its transformers experts loaded in `dtype` (and batched up to
    `max_batch`, when given)."""
    import yaml

    from maestro_core.registry import DEFAULT_REGISTRY, parse_registry

    raw = yaml.safe_load(Path(DEFAULT_REGISTRY).read_text())
    for e in raw["experts"]:
        if e["backend"].get("kind") == "transformers":
            e["backend"]["dtype"] = dtype
            if max_batch is not None:
                e["backend"]["max_batch"] = e["max_concurrency"] = max_batch
    return parse_registry(raw, source=f"{DEFAULT_REGISTRY} ({dtype})")


def lm_pairs(registry, only: list[str] | None = None) -> list[str]:
    """The registry's pairs whose expert is a transformers LM (or just those in `only`)."""
    from maestro_core.evaluation import level1_pairs

    return [p for p in level1_pairs(registry)
            if registry.experts[p.split("@@")[0]].kind == "transformers" and (only is None or p in only)]


async def run(dtype: str, items, only: list[str] | None, max_batch: int | None) -> dict:
    from maestro_core.cache import ExpertCache
    from maestro_core.evaluation import pair_table
    from maestro_core.experts import build_experts

    registry = lm_registry(dtype, max_batch)  # experts load on first use: only the pairs' LMs do
    pairs = lm_pairs(registry, only)
    backends = build_experts(registry)
    try:
        await asyncio.gather(*(backends[p.split("@@")[0]].load() for p in pairs))  # loading is not timed
        t0 = time.perf_counter()
        table = await pair_table(registry, backends, items, cache=ExpertCache(None), run_id=f"lm-{dtype}",
                                 pairs=pairs, concurrent_pairs=2)
        seconds = time.perf_counter() - t0
    finally:
        for b in backends.values():
            await b.aclose()
    return {"seconds": seconds, "pairs": {p: {"accuracy": sum(t.outcome for t in ts) / len(ts),
                                              "answers": [t.final_answer for t in ts]} for p, ts in table.items()}}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--small", action="store_true", help="4 questions, SmolLM2's math pair only (what the tests run).")
    p.add_argument("--out", type=Path, default=_common.RESULTS, help="folder of the JSON result (default: %(default)s).")
    p.add_argument("--home", type=Path, default=None, help="a Maestro home with a built suite: run its test split.")
    p.add_argument("--max-batch", type=int, default=None, help="batch every LM up to N (default: the registry's).")
    args = p.parse_args()
    started = time.perf_counter()
    only = ["smollm2-135m@@math"] if args.small else None
    with tempfile.TemporaryDirectory() as tmp:
        if args.home is not None:
            from maestro_core.suite import load_suite

            items, source = load_suite(home=args.home, split="test"), f"test split of {args.home}"
        else:
            from maestro_core.benchmarks import math as bmath

            n = 4 if args.small else 40
            items, source = bmath.generate(n, 19, Path(tmp)), f"{n} generated math questions (seed 19)"
        results = {dt: asyncio.run(run(dt, items, only, args.max_batch)) for dt in DTYPES}
    base = results["float32"]["pairs"]
    rows, out = [], {}
    for dt, r in results.items():
        differ = {pair: sum(a != b for a, b in zip(v["answers"], base[pair]["answers"])) for pair, v in r["pairs"].items()}
        out[dt] = {"seconds": round(r["seconds"], 2),
                   "pairs": {pair: {"accuracy": v["accuracy"], "answers_differing_from_float32": differ[pair]}
                             for pair, v in r["pairs"].items()}}
        rows += [[dt, pair, v["accuracy"], differ[pair], r["seconds"]] for pair, v in r["pairs"].items()]
    print(f"{len(items)} items: {source}; batches: {args.max_batch or 'as in the registry'}\n")
    _common.print_table(["dtype", "pair", "accuracy", "answers differing from float32", "seconds (all pairs)"], rows)
    speedup = results["float32"]["seconds"] / results["bfloat16"]["seconds"]
    print(f"\nfloat32 / bfloat16 time: {speedup:.2f}")
    from maestro_core.weights import native_cpu_bf16

    _common.write_result("lm_experts", args, {
        "items": len(items), "source": source, "max_batch": args.max_batch or "registry",
        "native_cpu_bf16": native_cpu_bf16(), "dtypes": out,
        "float32_over_bfloat16_time": round(speedup, 3)}, started)


if __name__ == "__main__":
    main()
