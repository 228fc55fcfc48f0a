"""Subprocess driver for tests/test_crash_safety.py: real rollout collection and store writes,
in a process the test kills with SIGKILL at a random moment. Run from the repository root:

    python -m tests.crash_driver collect --home H --data items.jsonl --registry tiny.yaml --run-id R \\
        [--iterations 2] [--chunk-size 4] [--group-size 2]
        # per iteration: chunk specs -> run_chunk(skip_existing=True) (one Parquet shard per chunk,
        # episodes through EpisodeRunner) -> Store.load_shards (the one DuckDB writer), with the
        # store open the whole time, as the training loop does
    python -m tests.crash_driver ingest --home H --run-id R [--chunks 40] [--episodes 100]
        # Store.write_and_ingest of chunk after chunk (shard + DuckDB transaction), with a small
        # DuckDB checkpoint threshold (256KB: a checkpoint, WAL -> database file, after every commit)

It prints `READY` once the store is open, one line per finished unit of work (`CHUNK it c n`,
`LOADED it keys episodes`, `INGESTED c`) and `DONE` at the end, each flushed at once, so the
test knows what had certainly finished when it killed the process. Collection uses the
`maestro_core` calls that `maestro collect` and the train orchestrator make, without Prefect's
ephemeral API (15-25 s to start on 2 cores), so that many kill trials fit in one test.
"""

from __future__ import annotations

import argparse
import sys


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def collect(args: argparse.Namespace) -> None:
    from maestro_core.dataset import load_jsonl
    from maestro_core.rollouts import chunk_specs, run_chunk
    from maestro_core.store import Store

    items = load_jsonl(args.data)
    with Store(args.home) as store:
        _say("READY")
        for it in range(args.iterations):
            specs = chunk_specs(items, run_id=args.run_id, iteration=it, chunk_size=args.chunk_size,
                                policy_spec={"kind": "fixed-route", "pair": args.pair},
                                object_store=str(store.home / "objects"), registry_path=args.registry,
                                group_size=args.group_size)
            for spec in specs:
                res = run_chunk(spec, skip_existing=True)
                _say("CHUNK", it, spec.chunk, "skipped" if res["skipped"] else res["episodes"])
            keys = store.load_shards(args.run_id, it)
            _say("LOADED", it, len(keys), store.count_episodes(args.run_id, it))
    _say("DONE")


def ingest(args: argparse.Namespace) -> None:
    from maestro_core.store import Store
    from tests.store_helpers import make_chunk

    with Store(args.home) as store:
        # 256KB: a checkpoint after every commit, so a kill also lands while DuckDB moves the WAL
        # into the file; 16MB (DuckDB's default): the WAL grows
        store.query(f"SET checkpoint_threshold = '{args.checkpoint_threshold}'")
        _say("READY")
        for c in range(args.chunks):
            trajs = make_chunk(args.run_id, 0, c, n=args.episodes, start=c * args.episodes, n_steps=3)
            store.write_and_ingest(trajs, args.run_id, 0, c)
            _say("INGESTED", c)
    _say("DONE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crash_driver")
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--home", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--registry", required=True)
    c.add_argument("--run-id", required=True)
    c.add_argument("--pair", default="calc@@math")
    c.add_argument("--iterations", type=int, default=2)
    c.add_argument("--chunk-size", type=int, default=4)
    c.add_argument("--group-size", type=int, default=2)
    c.set_defaults(func=collect)
    i = sub.add_parser("ingest")
    i.add_argument("--home", required=True)
    i.add_argument("--run-id", required=True)
    i.add_argument("--chunks", type=int, default=40)
    i.add_argument("--episodes", type=int, default=100)
    i.add_argument("--checkpoint-threshold", default="256KB")
    i.set_defaults(func=ingest)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
