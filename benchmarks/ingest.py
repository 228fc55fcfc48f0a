"""Trajectory ingest into DuckDB: the Store against a bare DuckDB Arrow insert of the same rows.

    .venv/bin/python benchmarks/ingest.py [--small]

Data: E episodes (2,000; 200 with --small) of a token policy, 2 or 3 steps each (calls, then an
answer), 60 prompt tokens, 8 tokens per turn, 24 per observation, catalogue-sized prompt text.

Ours, each on a fresh store (best of 5: the cores and the disk are shared, and DuckDB's commit
waits on the disk):
- ingest_trajectories(arrow table): what Store.load_shards does with a shard (the table is in
  TRAJECTORY_SCHEMA already): checks, delete-then-insert in one transaction, the per-episode
  token columns and the steps unnested in SQL;
- ingest_trajectories(Trajectory objects): the same plus the Python -> Arrow conversion;
- write_and_ingest(Trajectory objects): the same plus the Parquet shard in the object store
  (what the training loop calls);
- ingest again (replace): the same chunk a second time (a retried chunk).

Bare: a fresh DuckDB file with the store's own `episodes` and `steps` tables (same DDL, primary
keys included), and the exact rows the store ended up with, already flat in Arrow, inserted with
`INSERT INTO t SELECT * FROM arrow` in one transaction: the least any ingest of these rows into
this layout can cost.

Figure: bare_time / our_time for ingest_trajectories(arrow table); target >= 0.8.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import duckdb

import _common

from maestro_core.store import DB_FILENAME, Store
from maestro_core.trajectory import StepRecord, Trajectory, episode_id, to_arrow

TARGET = 0.8
REPEATS = 5
PROMPT_TEXT = ("Actions: " + " ".join(f"expert{e}@@skill{s}" for e in range(6) for s in range(5))
               + "\nOne action per turn: <call>ACTION: input</call> or <answer>text</answer>.\n"
               "Question: What is the value of the largest bar in the chart?")


def trajectories(n: int, run_id: str = "ingest") -> list[Trajectory]:
    out = []
    for i in range(n):
        item, sample = f"item-{i // 8:05d}", i % 8
        n_steps = 2 + i % 2
        steps = []
        for turn in range(n_steps):
            ids = tuple(100 + (i + turn + k) % 1500 for k in range(8))
            lps = tuple(-0.1 * (k + 1) for k in range(8))
            if turn < n_steps - 1:
                steps.append(StepRecord(
                    turn=turn, text="<call>expert1@@skill2</call>", action="call", expert="expert1", skill="skill2",
                    solver="direct", call_input="What is the value of the largest bar in the chart?",
                    observation=f"<information>{i * 7 % 1000} (confidence 0.87)</information>",
                    completion_ids=ids, logprobs=lps, observation_ids=tuple(range(200, 224)), cost=0.0004,
                    latency_s=0.8, spent_s=0.8, cache_hit=False, tokens_in=310, tokens_out=12, confidence=0.87,
                    expert_calls=1))
            else:
                steps.append(StepRecord(turn=turn, text=f"<answer>{i * 7 % 1000}</answer>", action="answer",
                                        completion_ids=ids, logprobs=lps))
        out.append(Trajectory(
            episode_id=episode_id(run_id, 0, item, sample), run_id=run_id, iteration=0, chunk=0, item_id=item,
            benchmark="charts", sample_index=sample, registry_version="0123456789abcdef",
            checkpoint_id=f"{run_id}/ckpt-0", prompt_text=PROMPT_TEXT, prompt_ids=tuple(range(5, 65)),
            steps=tuple(steps), final_answer=str(i * 7 % 1000), finish_reason="answer", reward=float(i % 2),
            outcome=float(i % 2), format_score=1.0, cost_term=0.0, cost_lambda=0.0, total_cost=0.0004 * (n_steps - 1),
            total_latency_s=0.8 * (n_steps - 1), spent_s=0.8 * (n_steps - 1), n_calls=n_steps - 1, n_cache_hits=0,
            created_at=1.7e9 + i))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours(trajs: list[Trajectory], table) -> tuple[dict[str, float], dict]:
    """Best seconds of each store path, and the rows (flat Arrow) and DDL the store produced."""
    times: dict[str, list[float]] = {"ingest_trajectories(arrow table)": [], "ingest_trajectories(objects)": [],
                                     "write_and_ingest(objects)": [], "ingest again (replace)": []}
    rows = None
    for _ in range(REPEATS):
        for name in ("ingest_trajectories(arrow table)", "ingest_trajectories(objects)", "write_and_ingest(objects)"):
            with tempfile.TemporaryDirectory() as tmp, Store(tmp) as st:
                if name == "ingest_trajectories(arrow table)":
                    times[name].append(timed(lambda: st.ingest_trajectories(table, "ingest", 0, 0)))
                    times["ingest again (replace)"].append(timed(lambda: st.ingest_trajectories(table, "ingest", 0, 0)))
                    if rows is None:
                        rows = {"episodes": st.query("SELECT * FROM episodes"), "steps": st.query("SELECT * FROM steps"),
                                "ddl": [r["sql"] for r in st.query(
                                    "SELECT sql FROM duckdb_tables() WHERE table_name IN ('episodes', 'steps') "
                                    "ORDER BY table_name").to_pylist()]}
                elif name == "ingest_trajectories(objects)":
                    times[name].append(timed(lambda: st.ingest_trajectories(trajs, "ingest", 0, 0)))
                else:
                    times[name].append(timed(lambda: st.write_and_ingest(trajs, "ingest", 0, 0)))
    return {k: min(v) for k, v in times.items()}, rows


def bare(rows: dict) -> float:
    episodes, steps = rows["episodes"], rows["steps"]
    times = []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as tmp:
            con = duckdb.connect(str(Path(tmp) / DB_FILENAME))
            for ddl in rows["ddl"]:
                con.execute(ddl)
            con.register("ep_rows", episodes)
            con.register("step_rows", steps)

            def insert() -> None:
                con.execute("BEGIN TRANSACTION")
                con.execute("INSERT INTO episodes SELECT * FROM ep_rows")
                con.execute("INSERT INTO steps SELECT * FROM step_rows")
                con.execute("COMMIT")

            times.append(timed(insert))
            assert con.execute("SELECT count(*) FROM steps").fetchone()[0] == steps.num_rows
            con.close()
    return min(times)


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    n = 200 if args.small else 2_000
    trajs = trajectories(n)
    table = to_arrow(trajs)
    n_steps = sum(len(t.steps) for t in trajs)
    our, rows = ours(trajs, table)
    bare_s = bare(rows)
    ratios = {k: bare_s / v for k, v in our.items()}
    print(f"{n} episodes, {n_steps} steps, best of {REPEATS}\n")
    _common.print_table(["path", "seconds", "episodes/s", "bare/ours"],
                        [["bare DuckDB Arrow insert", bare_s, n / bare_s, 1.0]]
                        + [[k, v, n / v, ratios[k]] for k, v in our.items()])
    key = "ingest_trajectories(arrow table)"
    met = ratios[key] >= TARGET
    print(f"\nbare/ours for {key}: {ratios[key]:.3f} (target >= {TARGET}: {'met' if met else 'NOT met'})")
    _common.write_result("ingest", args, {
        "episodes": n, "steps": n_steps, "repeats": REPEATS, "bare_s": bare_s, "ours_s": our, "ratio_bare_over_ours": ratios,
        "target": {"metric": f"bare_time / our_time, {key}", "min": TARGET, "value": ratios[key], "met": met}}, started)


if __name__ == "__main__":
    main()
