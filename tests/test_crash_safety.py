"""Crash safety (issue #7): SIGKILL at random moments during rollout collection and store
writes, then a rerun.

A subprocess (tests/crash_driver.py) runs a real collection: chunk specs -> run_chunk with
skip_existing (episodes through EpisodeRunner with in-process experts, one Parquet shard per
chunk, written atomically) -> Store.load_shards into DuckDB; or a loop of
Store.write_and_ingest. The test kills it with SIGKILL after a seeded random delay, checks that
the DuckDB file opens and holds only whole chunks, reruns the driver to completion and checks
the result against an uninterrupted run: the same episodes (no duplicate (iteration, item_id,
sample_index), none missing), every step row with its episode, the same steps per episode.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maestro_core.shards import list_shards
from maestro_core.store import Store
from tests.pipeline_helpers import write_registry
from tests.reliability_figures import figures  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 10
SEED = 20261125
KILL_WINDOW = 0.9
"""Kill delays are drawn uniformly in [0, KILL_WINDOW x the uninterrupted run's length]: the
reference run's, or less once a trial finished before its kill (its delay bounds that run's
length; a reference run slowed by other work on the machine would otherwise miss kills)."""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, object]:
    f = open(log, "w")  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen([sys.executable, "-m", "tests.crash_driver", *args], cwd=ROOT, env=_env(),
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> float:
    """Poll the log until the driver says READY; returns the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "READY" in _lines(log):
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before READY:\n{log.read_text()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"driver not READY after {timeout} s:\n{log.read_text()}")


def _run_to_end(args: list[str], log: Path, timeout: float = 300.0) -> float:
    """Run the driver uninterrupted; returns the seconds from READY to exit."""
    proc, f = _start(args, log)
    try:
        ready = _wait_ready(proc, log)
        rc = proc.wait(timeout=timeout)
        took = time.monotonic() - ready
    finally:
        f.close()
    assert rc == 0 and _lines(log)[-1] == "DONE", log.read_text()
    return took


def _run_and_kill(args: list[str], log: Path, delay: float) -> bool:
    """Start the driver, SIGKILL it `delay` s after READY; True when the kill hit a running
    process (False: it had already finished)."""
    proc, f = _start(args, log)
    try:
        ready = _wait_ready(proc, log)
        time.sleep(max(0.0, ready + delay - time.monotonic()))
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        f.close()
    if killed:
        assert rc == -signal.SIGKILL, (rc, log.read_text())
    return killed


def _tmp_files(home: Path) -> int:
    """Temp files of puts a kill cut short (never listed as objects)."""
    return sum(1 for p in (home / "objects").rglob(".maestro-tmp-*"))


# ---------------------------------------------------------------------------------------
# kill -9 during collection (rollouts -> shards -> DuckDB)
# ---------------------------------------------------------------------------------------

N_ITEMS = 96
ITERATIONS = 3
CHUNK_SIZE = 4
GROUP = 2


def _items(path: Path) -> Path:
    ops = [("+", lambda a, b: a + b), ("*", lambda a, b: a * b), ("-", lambda a, b: a - b)]
    rows = []
    for i in range(N_ITEMS):
        sym, fn = ops[i % 3]
        a, b = 3 + i, 2 + (i * 7) % 11
        rows.append({"id": f"q{i:03d}", "benchmark": "arith", "question": f"What is {a} {sym} {b}?",
                     "answer": str(fn(a, b)), "scorer": "numeric"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _snapshot(home: Path, run_id: str) -> dict:
    """What the store holds for the run, checked for the invariants on the way."""
    with Store(home) as st:  # the DuckDB file opens (a kill left a WAL: replayed here)
        dups = st.query("SELECT iteration, item_id, sample_index, count(*) AS n FROM episodes WHERE run_id = ? "
                        "GROUP BY ALL HAVING count(*) > 1", [run_id]).num_rows
        orphans = st.query("SELECT count(*) AS n FROM steps WHERE episode_id NOT IN "
                           "(SELECT episode_id FROM episodes)")["n"][0].as_py()
        per_episode = {r["episode_id"]: (r["iteration"], r["chunk"], r["item_id"], r["sample_index"], r["n_steps"],
                                         r["final_answer"], r["reward"])
                       for r in st.query(
                           "SELECT e.episode_id, e.iteration, e.chunk, e.item_id, e.sample_index, e.final_answer, "
                           "e.reward, (SELECT count(*) FROM steps s WHERE s.episode_id = e.episode_id) AS n_steps "
                           "FROM episodes e WHERE run_id = ?", [run_id]).to_pylist()}
        per_chunk = {(r["iteration"], r["chunk"]): r["n"] for r in st.query(
            "SELECT iteration, chunk, count(*) AS n FROM episodes WHERE run_id = ? GROUP BY ALL", [run_id]).to_pylist()}
        return {"episodes": st.count_episodes(run_id), "steps": st.count_steps(run_id), "dups": dups,
                "orphan_steps": orphans, "per_episode": per_episode, "per_chunk": per_chunk,
                "shards": len(list_shards(st.objects, run_id)), "counts": st.counts()}


@pytest.mark.slow
def test_kill_during_collection_then_rerun_recovers_exactly(tmp_path, figures):  # noqa: F811
    registry = write_registry(tmp_path / "tiny.yaml")
    data = _items(tmp_path / "items.jsonl")

    def args(home: Path) -> list[str]:
        return ["collect", "--home", str(home), "--data", str(data), "--registry", str(registry), "--run-id", "crash",
                "--iterations", str(ITERATIONS), "--chunk-size", str(CHUNK_SIZE), "--group-size", str(GROUP)]

    ref_home = tmp_path / "reference"
    ref_s = _run_to_end(args(ref_home), tmp_path / "reference.log")
    ref = _snapshot(ref_home, "crash")
    chunk_n = CHUNK_SIZE * GROUP
    per_iteration = -(-N_ITEMS // CHUNK_SIZE)
    n_chunks = ITERATIONS * per_iteration
    assert ref["episodes"] == ITERATIONS * N_ITEMS * GROUP and ref["shards"] == n_chunks
    assert ref["dups"] == 0 and ref["orphan_steps"] == 0 and all(v[4] >= 1 for v in ref["per_episode"].values())

    rng = random.Random(SEED)
    trials = []
    window = ref_s
    for t in range(TRIALS):
        home = tmp_path / f"trial{t}"
        delay = rng.uniform(0.0, KILL_WINDOW * window)
        log = tmp_path / f"trial{t}-killed.log"
        killed = _run_and_kill(args(home), log, delay)
        if not killed:
            window = min(window, delay)
        lines = _lines(log)
        done_chunks = sum(1 for ln in lines if ln.startswith("CHUNK"))
        loaded = sum(1 for ln in lines if ln.startswith("LOADED"))
        # where the kill landed: running episodes / writing shards, or loading shards into DuckDB
        phase = ("finished" if not killed else "load_shards" if done_chunks == (loaded + 1) * per_iteration
                 else "rollouts")
        wal = (home / "maestro.duckdb.wal").exists()
        tmp_left = _tmp_files(home)
        # right after the kill: the file opens, and holds whole chunks only
        after_kill = _snapshot(home, "crash")
        assert after_kill["dups"] == 0 and after_kill["orphan_steps"] == 0
        assert all(n == chunk_n for n in after_kill["per_chunk"].values()), after_kill["per_chunk"]
        # rerun to completion
        rerun_log = tmp_path / f"trial{t}-rerun.log"
        _run_to_end(args(home), rerun_log)
        rerun = _lines(rerun_log)
        skipped = sum(1 for ln in rerun if ln.startswith("CHUNK") and ln.endswith("skipped"))
        final = _snapshot(home, "crash")
        assert final["episodes"] == ref["episodes"] and final["steps"] == ref["steps"]
        assert final["dups"] == 0 and final["orphan_steps"] == 0 and final["shards"] == n_chunks
        # the same episodes with the same steps, answers and rewards (ids are deterministic)
        assert final["per_episode"] == ref["per_episode"]
        lost = len(set(ref["per_episode"]) - set(final["per_episode"]))
        trials.append({"delay_s": round(delay, 3), "killed": killed, "phase": phase,
                       "chunks_done_before_kill": done_chunks,
                       "iterations_loaded_before_kill": loaded, "episodes_in_db_after_kill": after_kill["episodes"],
                       "wal_after_kill": wal, "tmp_files_after_kill": tmp_left, "chunks_skipped_on_rerun": skipped,
                       "episodes_after_rerun": final["episodes"], "rows_lost": lost,
                       "duplicates": final["dups"], "orphan_steps": final["orphan_steps"]})

    figures.update({
        "trials": TRIALS, "seed": SEED, "kills": sum(t["killed"] for t in trials),
        "reference_episodes": ref["episodes"], "reference_steps": ref["steps"], "reference_chunks": n_chunks,
        "reference_work_s": round(ref_s, 2), "rows_lost": sum(t["rows_lost"] for t in trials),
        "duplicates": sum(t["duplicates"] for t in trials), "orphan_steps": sum(t["orphan_steps"] for t in trials),
        "kills_with_wal_left": sum(t["wal_after_kill"] for t in trials),
        "kills_with_tmp_files_left": sum(1 for t in trials if t["tmp_files_after_kill"]),
        "kills_during_rollouts": sum(t["phase"] == "rollouts" for t in trials),
        "kills_during_load_shards": sum(t["phase"] == "load_shards" for t in trials),
        "per_trial": trials,
    })
    assert figures["kills"] >= TRIALS - 1  # the delays are drawn inside the run's length


# ---------------------------------------------------------------------------------------
# kill -9 during Store.write_and_ingest (shard + DuckDB transaction, frequent checkpoints)
# ---------------------------------------------------------------------------------------

INGEST_CHUNKS = 30
INGEST_EPISODES = 100
STEPS_PER_EPISODE = 3
CHECKPOINT_THRESHOLDS = ("256KB", "16MB")
"""Alternate trials: a checkpoint after every commit (the kill often lands in one), or DuckDB's
default (the WAL grows; the kill lands while it is appended to)."""


@pytest.mark.slow
def test_kill_during_ingest_leaves_whole_chunks_and_reingest_is_exact(tmp_path, figures):  # noqa: F811
    def args(home: Path, threshold: str = "16MB") -> list[str]:
        return ["ingest", "--home", str(home), "--run-id", "ing", "--chunks", str(INGEST_CHUNKS),
                "--episodes", str(INGEST_EPISODES), "--checkpoint-threshold", threshold]

    ref_s = {thr: _run_to_end(args(tmp_path / f"reference-{thr}", thr), tmp_path / f"reference-{thr}.log")
             for thr in CHECKPOINT_THRESHOLDS}
    rng = random.Random(SEED + 1)
    trials = []
    window = dict(ref_s)
    for t in range(TRIALS):
        home = tmp_path / f"trial{t}"
        threshold = CHECKPOINT_THRESHOLDS[t % 2]
        delay = rng.uniform(0.0, KILL_WINDOW * window[threshold])
        log = tmp_path / f"trial{t}.log"
        killed = _run_and_kill(args(home, threshold), log, delay)
        if not killed:
            window[threshold] = min(window[threshold], delay)
        acked = {int(ln.split()[1]) for ln in _lines(log) if ln.startswith("INGESTED")}
        wal = (home / "maestro.duckdb.wal").exists()
        with Store(home) as st:  # opens: DuckDB replays or drops the WAL
            per_chunk = {r["chunk"]: (r["n"], r["steps"]) for r in st.query(
                "SELECT chunk, count(*) AS n, sum((SELECT count(*) FROM steps s WHERE s.episode_id = e.episode_id)) "
                "AS steps FROM episodes e WHERE run_id = 'ing' GROUP BY chunk").to_pylist()}
            # every chunk the driver had finished is there whole; any other is whole or absent
            assert acked <= set(per_chunk), (acked, per_chunk)
            assert all(v == (INGEST_EPISODES, INGEST_EPISODES * STEPS_PER_EPISODE) for v in per_chunk.values())
            in_db = sum(n for n, _ in per_chunk.values())
            orphans = st.query("SELECT count(*) AS n FROM steps WHERE episode_id NOT IN "
                               "(SELECT episode_id FROM episodes)")["n"][0].as_py()
            assert orphans == 0
            # re-ingest from the shards: exact counts (a shard may be ahead of the database:
            # written, then the kill before its transaction committed)
            shards = st.load_shards("ing")
            assert st.count_episodes("ing") == len(shards) * INGEST_EPISODES
            assert st.count_steps("ing") == len(shards) * INGEST_EPISODES * STEPS_PER_EPISODE
            shards_ahead = len(shards) - len(per_chunk)
        _run_to_end(args(home, threshold), tmp_path / f"trial{t}-rerun.log")
        with Store(home) as st:
            total = st.count_episodes("ing")
            steps = st.count_steps("ing")
            dups = st.query("SELECT item_id FROM episodes GROUP BY ALL HAVING count(*) > 1").num_rows
        assert total == INGEST_CHUNKS * INGEST_EPISODES and steps == total * STEPS_PER_EPISODE and dups == 0
        trials.append({"delay_s": round(delay, 3), "checkpoint_threshold": threshold, "killed": killed,
                       "chunks_acknowledged": len(acked),
                       "chunks_in_db_after_kill": len(per_chunk), "episodes_in_db_after_kill": in_db,
                       "shards_ahead_of_db": shards_ahead, "wal_after_kill": wal,
                       "episodes_after_rerun": total, "rows_lost": INGEST_CHUNKS * INGEST_EPISODES - total})
    figures.update({
        "trials": TRIALS, "seed": SEED + 1, "kills": sum(t["killed"] for t in trials),
        "chunks": INGEST_CHUNKS, "episodes_per_chunk": INGEST_EPISODES,
        "reference_work_s": {k: round(v, 2) for k, v in ref_s.items()},
        "rows_lost": sum(t["rows_lost"] for t in trials), "partial_chunks": 0,
        "kills_with_wal_left": sum(t["wal_after_kill"] for t in trials),
        "kills_with_shard_ahead_of_db": sum(1 for t in trials if t["shards_ahead_of_db"] > 0),
        "per_trial": trials,
    })
    assert figures["kills"] >= TRIALS - 1
