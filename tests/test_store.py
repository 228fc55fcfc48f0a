"""The DuckDB store: schema, idempotent ingest, round trips, shards from other processes, the
expert cache, runs/registries/evals, S3 end to end and the one-writer lock."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from maestro_core.errors import SchemaMismatch, StorageError
from maestro_core.shards import list_shards, shard_key
from maestro_core.store import DB_FILENAME, SCHEMA_VERSION, TABLES, Store
from maestro_core.trajectory import to_arrow
from tests.store_helpers import make_chunk, moto_endpoint, new_bucket, s3_env  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def by_id(trajs):
    return sorted(trajs, key=lambda t: t.episode_id)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "home") as st:
        yield st


# -- opening and schema ----------------------------------------------------------------

def test_schema_created(store: Store) -> None:
    assert (store.home / DB_FILENAME).is_file()
    names = {r["table_name"] for r in store.query(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").to_pylist()}
    assert names == set(TABLES)
    assert store.query("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0].as_py() == str(SCHEMA_VERSION)
    ep_cols = store.query("SELECT * FROM episodes LIMIT 0").column_names
    assert {"completion_ids", "env_mask", "logprobs", "prompt_ids", "reward", "chunk"} <= set(ep_cols)
    assert "steps" not in ep_cols
    assert store.counts() == {t: (2 if t == "meta" else 0) for t in TABLES}


def test_home_from_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "from-env"))
    with Store() as st:
        assert st.home == tmp_path / "from-env" and st.db_path.is_file()
        assert st.objects.uri() == (tmp_path / "from-env" / "objects").as_uri()
    monkeypatch.delenv("MAESTRO_HOME")
    monkeypatch.chdir(tmp_path)
    with Store() as st:
        assert st.home == tmp_path / ".maestro" and (tmp_path / ".maestro" / DB_FILENAME).is_file()


def test_reopen_keeps_data(tmp_path: Path) -> None:
    with Store(tmp_path) as st:
        st.write_and_ingest(make_chunk("r1", 0, 0, n=3), "r1", 0, 0)
        st.record_run("r1", "grpo", {"lr": 1e-6})
    with Store(tmp_path) as st:
        assert st.count_episodes("r1") == 3 and st.count_steps("r1") == 9
        assert st.run("r1")["config"] == {"lr": 1e-6}
    with pytest.raises(StorageError, match="closed"):
        st.count_episodes()


def test_schema_mismatch_names_file_versions_and_fix(tmp_path: Path) -> None:
    Store(tmp_path).close()
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(SchemaMismatch) as e:
        Store(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / DB_FILENAME) in msg and "99" in msg and f"schema version {SCHEMA_VERSION}" in msg
    assert "MAESTRO_HOME" in msg and "move the old home aside" in msg
    # the failed open released the file: it can be fixed and opened again
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    con.close()
    Store(tmp_path).close()


def test_foreign_duckdb_file_is_a_schema_mismatch(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    con.execute("CREATE TABLE something_else (x INT)")
    con.close()
    with pytest.raises(SchemaMismatch, match="no Maestro schema version"):
        Store(tmp_path)


def test_second_process_gets_a_clear_lock_error(tmp_path: Path) -> None:
    Store(tmp_path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, duckdb
            con = duckdb.connect({str(tmp_path / DB_FILENAME)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StorageError) as e:
            Store(tmp_path)
        msg = str(e.value)
        assert "another process" in msg and "one writing process" in msg and "load_shards" in msg
        assert str(tmp_path / DB_FILENAME) in msg
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    Store(tmp_path).close()  # free again once the other process is gone


# -- trajectories ----------------------------------------------------------------------

def test_ingest_is_idempotent_and_a_retry_replaces_the_chunk(store: Store) -> None:
    store.ingest_trajectories(make_chunk("r1", 0, 0, n=5), "r1", 0, 0)
    store.ingest_trajectories(make_chunk("r1", 0, 1, n=2, start=100), "r1", 0, 1)
    store.ingest_trajectories(make_chunk("r1", 0, 0, n=5), "r1", 0, 0)  # same chunk again
    assert store.count_episodes("r1", 0, chunk=0) == 5 and store.count_steps("r1") == 7 * 3
    # a smaller retried chunk (fewer items, fewer steps) replaces the larger first attempt
    retry = make_chunk("r1", 0, 0, n=2, start=50, n_steps=2)
    store.ingest_trajectories(to_arrow(retry), "r1", 0, 0)
    assert store.count_episodes("r1", 0, chunk=0) == 2 and store.count_episodes("r1") == 4
    assert store.count_steps("r1") == 2 * 2 + 2 * 3
    assert by_id(t for t in store.trajectories("r1") if t.chunk == 0) == by_id(retry)
    # chunk 1 was not touched
    assert store.count_episodes("r1", 0, chunk=1) == 2
    # an empty retry empties the chunk
    store.ingest_trajectories([], "r1", 0, 0)
    assert store.count_episodes("r1", 0, chunk=0) == 0 and store.count_steps("r1") == 2 * 3


def test_ingest_refuses_inconsistent_chunks_and_changes_nothing(store: Store) -> None:
    store.ingest_trajectories(make_chunk("r1", 0, 0, n=2), "r1", 0, 0)
    with pytest.raises(ValueError, match="chunk"):
        store.ingest_trajectories(make_chunk("r1", 0, 3, n=2), "r1", 0, 0)
    dup = make_chunk("r1", 0, 0, n=1) * 2
    with pytest.raises(StorageError, match="same episode_id twice"):
        store.ingest_trajectories(dup, "r1", 0, 0)
    assert store.count_episodes("r1") == 2 and store.count_steps() == 6


def test_failed_ingest_rolls_back(store: Store) -> None:
    first = make_chunk("r1", 0, 0, n=2)
    store.ingest_trajectories(first, "r1", 0, 0)
    bad = make_chunk("r1", 0, 0, n=3)
    t = bad[1]
    bad[1] = dataclasses.replace(t, steps=(t.steps[0], t.steps[0]))  # turn 0 twice: the steps PK fails
    with pytest.raises(StorageError, match="nothing was changed"):
        store.ingest_trajectories(bad, "r1", 0, 0)
    # the delete of the first attempt was rolled back with the failed insert
    assert by_id(store.trajectories("r1")) == by_id(first) and store.count_steps() == 6
    store.ingest_trajectories(make_chunk("r1", 0, 0, n=3), "r1", 0, 0)  # the store is still usable
    assert store.count_episodes("r1") == 3


def test_round_trip_trajectory_shard_duckdb_trajectory(store: Store) -> None:
    chunk0, chunk1 = make_chunk("r1", 2, 0, n=4), make_chunk("r1", 2, 1, n=3, start=10, n_steps=1)
    key = store.write_and_ingest(chunk0, "r1", 2, 0)
    store.write_and_ingest(chunk1, "r1", 2, 1)
    store.write_and_ingest(make_chunk("r2", 0, 0, n=1), "r2", 0, 0)
    assert key == shard_key("r1", 2, 0) and store.objects.exists(key)
    back = store.trajectories("r1", iteration=2)
    assert by_id(back) == by_id(chunk0 + chunk1)  # every field, steps, token ids and logprobs
    assert [t.chunk for t in back] == [0] * 4 + [1] * 3  # ordered by iteration, chunk, item
    assert store.trajectories("r1", iteration=7) == []
    # the episodes table holds the interleaved training view of each trajectory
    rows = {r["episode_id"]: r for r in store.episodes("r1").to_pylist()}
    assert len(rows) == 7
    for t in chunk0 + chunk1:
        r = rows[t.episode_id]
        assert r["completion_ids"] == t.completion_ids()
        assert r["env_mask"] == t.env_mask()
        assert r["logprobs"] == t.completion_logprobs()
        assert r["prompt_ids"] == list(t.prompt_ids) and r["reward"] == t.reward
    steps = store.steps(chunk0[0].episode_id).to_pylist()
    assert [s["turn"] for s in steps] == [0, 1, 2]
    assert steps[0]["observation_ids"] == list(chunk0[0].steps[0].observation_ids)
    assert store.episodes(run_id="r1", iteration=2).num_rows == 7 and store.episodes().num_rows == 8


def test_load_shards_written_by_another_process(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    script = textwrap.dedent(f"""
        import sys
        from maestro_core.objectstore import open_object_store
        from maestro_core.shards import write_shard
        from tests.store_helpers import make_chunk
        st = open_object_store({str(objects)!r})
        for c in range(3):
            write_shard(st, make_chunk("worker-run", 1, c, n=4, start=10 * c), "worker-run", 1, c)
        write_shard(st, make_chunk("worker-run", 2, 0, n=1), "worker-run", 2, 0)
        # a worker needs neither DuckDB nor the store
        assert "duckdb" not in sys.modules and "maestro_core.store" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    with Store(tmp_path / "home", object_store=objects) as st:
        assert st.load_shards("worker-run", iteration=1) == [shard_key("worker-run", 1, c) for c in range(3)]
        assert st.count_episodes("worker-run") == 12
        assert len(st.load_shards("worker-run")) == 4
        st.load_shards("worker-run")  # loading again changes nothing
        assert st.count_episodes("worker-run") == 13 and st.count_steps("worker-run") == 13 * 3
        expected = [t for c in range(3) for t in make_chunk("worker-run", 1, c, n=4, start=10 * c)]
        assert by_id(st.trajectories("worker-run", 1)) == by_id(expected)


def test_ingest_10k_episodes_is_fast(store: Store) -> None:
    # 10k distinct episodes, built by relabelling copies of one chunk (building Trajectory
    # objects one by one would time the test helper, not the store)
    base = to_arrow(make_chunk("big", 0, 0, n=100))
    parts = []
    for k in range(100):
        t = base.set_column(0, "episode_id", pc.binary_join_element_wise(base["episode_id"], pa.scalar(f"-{k}"), ""))
        parts.append(t.set_column(4, "item_id", pc.binary_join_element_wise(t["item_id"], pa.scalar(f"-{k}"), "")))
    table = pa.concat_tables(parts)
    assert table.num_rows == 10_000
    t0 = time.perf_counter()
    store.ingest_trajectories(table, "big", 0, 0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.ingest_trajectories(table, "big", 0, 0)  # the retry path: delete + insert
    again = time.perf_counter() - t0
    assert store.count_episodes("big") == 10_000 and store.count_steps("big") == 30_000
    assert first < 3.0 and again < 3.0, (first, again)


# -- expert cache ----------------------------------------------------------------------

def test_cache_put_get(store: Store) -> None:
    assert store.cache_get_many([]) == {} and store.cache_get_many(["k1"]) == {}
    row = {"key": "k1", "expert": "calc", "skill": "math", "solver": "calculator", "text": "4",
           "confidence": None, "cost": 0.001, "latency_s": 0.2, "tokens_in": 3, "tokens_out": 1, "expert_calls": 1}
    store.cache_put_many([row, {**row, "key": "k2", "text": "5"}])
    got = store.cache_get_many(["k1", "k2", "missing", "k1"])
    assert set(got) == {"k1", "k2"}
    assert {k: got["k1"][k] for k in row} == row and got["k1"]["created_at"] > 0
    # first answer wins (also within one batch); replace=True overwrites
    store.cache_put_many([{**row, "text": "other"}, {**row, "text": "other2"}])
    assert store.cache_get_many(["k1"])["k1"]["text"] == "4"
    store.cache_put_many([{**row, "text": "new"}], replace=True)
    assert store.cache_get_many(["k1"])["k1"]["text"] == "new"
    assert store.counts()["expert_cache"] == 2
    with pytest.raises(ValueError, match="key"):
        store.cache_put_many([{"expert": "calc"}])
    with pytest.raises(ValueError, match="allowed columns"):
        store.cache_put_many([{**row, "bogus": 1}])


def test_cache_many_keys(store: Store) -> None:
    rows = [{"key": f"k{i}", "expert": "e", "text": str(i), "cost": 0.0} for i in range(5000)]
    store.cache_put_many(rows)
    got = store.cache_get_many(f"k{i}" for i in range(0, 6000, 2))
    assert len(got) == 2500 and got["k42"]["text"] == "42"


def test_an_expert_cache_asks_the_store_only_for_keys_it_holds(store: Store) -> None:
    """A cold cache's misses cost no store query each: the cache keeps the store's key set,
    and reads it again once anything (another cache on the same store too) wrote to it."""
    from maestro_core.cache import ExpertCache
    from maestro_core.skills import SkillResult

    store.cache_put_many([{"key": f"k{i}", "expert": "e", "skill": "s", "solver": "x", "text": str(i),
                           "confidence": 0.5, "cost": 0.01, "latency_s": 0.1, "tokens_in": 1, "tokens_out": 1,
                           "expert_calls": 1} for i in range(100)])
    cache, other = ExpertCache(store), ExpertCache(store)
    assert all(cache.get(f"absent{i}") is None for i in range(50)) and cache.store_queries == 0
    assert cache.get("k7").text == "7" and cache.store_queries == 1
    assert cache.get("k7").text == "7" and cache.store_queries == 1  # from memory now
    other.put("new", SkillResult(text="fresh", solver="x", confidence=None, cost=0.02, latency_s=0.1, tokens_in=1,
                                 tokens_out=1, expert_calls=1), expert="e", skill="s")
    assert cache.get("new") is None  # not flushed yet: not in the store
    other.flush()
    assert cache.get("new").text == "fresh" and cache.get("new").cost == 0.02 and cache.store_queries == 2


# -- registries, runs, measurements, evals, quarantine ---------------------------------

def test_registry_runs_stats_evals_quarantine(store: Store, registry) -> None:
    assert store.record_registry(registry) is True
    assert store.record_registry(registry) is False  # idempotent
    assert store.counts()["registry_versions"] == 1
    assert store.registry_content(registry.version) == registry.to_dict()
    assert store.registries()[0]["source"] == "unit.yaml"
    assert store.registry_content("nope") is None

    store.record_run("r1", "grpo", {"lr": 1e-6, "group": 4}, registry.version)
    run = store.run("r1")
    assert run["status"] == "created" and run["config"] == {"group": 4, "lr": 1e-6}
    store.set_run_status("r1", "running")
    store.record_run("r1", "grpo", {"lr": 2e-6}, registry.version, status="resumed")  # upsert
    run2 = store.run("r1")
    assert run2["status"] == "resumed" and run2["created_at"] == run["created_at"] and run2["config"] == {"lr": 2e-6}
    assert [r["run_id"] for r in store.runs(kind="grpo")] == ["r1"] and store.runs(kind="eval") == []
    assert store.run("nope") is None
    with pytest.raises(StorageError, match="no run 'nope'"):
        store.set_run_status("nope", "failed")

    stats = dict(latency_p50_s=0.1, latency_p95_s=0.4, tokens_in_mean=12.0, tokens_out_mean=3.0,
                 cost_per_call=0.001, n=50)
    store.record_expert_stats(registry.version, "calc", **stats)
    store.record_expert_stats(registry.version, "llm", **{**stats, "n": 7})
    store.record_expert_stats(registry.version, "llm", **{**stats, "n": 9})  # re-measured: replaced
    got = store.expert_stats(registry.version)
    assert sorted(got) == ["calc", "llm"] and got["llm"]["n"] == 9 and got["calc"]["latency_p95_s"] == 0.4
    assert store.expert_stats("other") == {}

    store.record_eval("r1", "maestro", "test", "gsm8k", {"accuracy": 0.5, "cost": 0.01})
    store.record_eval("r1", "maestro", "test", "gsm8k", {"accuracy": 0.6})  # rerun replaces
    store.record_eval("r1", "best-single", "test", "gsm8k", {"accuracy": 0.4})
    evals = store.eval_results("r1")
    assert [(e["system"], e["metrics"]) for e in evals] == [("best-single", {"accuracy": 0.4}),
                                                           ("maestro", {"accuracy": 0.6})]
    with pytest.raises(ValueError, match="JSON"):
        store.record_eval("r1", "x", "test", "gsm8k", {"bad": object()})

    store.record_quarantine("gsm8k/test.jsonl", "item-3", "no answer field")
    store.record_quarantine("gsm8k/test.jsonl", "item-3", "no answer field")
    assert [q["item_id"] for q in store.quarantined("gsm8k/test.jsonl")] == ["item-3"]


# -- S3 end to end ---------------------------------------------------------------------

def test_store_with_s3_object_store_end_to_end(tmp_path: Path, s3_env: str) -> None:
    location = f"s3://{new_bucket(s3_env)}/maestro/exp1"
    trajs = make_chunk("s3run", 0, 0, n=3)
    with Store(tmp_path / "a", object_store=location) as st:
        key = st.write_and_ingest(trajs, "s3run", 0, 0)
        assert st.objects.uri(key) == f"{location}/{key}"
        assert by_id(st.trajectories("s3run")) == by_id(trajs)
    # another home (say, another machine) rebuilds the run from the bucket alone
    with Store(tmp_path / "b", object_store=location) as st:
        assert list_shards(st.objects, "s3run") == [key]
        assert st.load_shards("s3run") == [key]
        assert by_id(st.trajectories("s3run")) == by_id(trajs)


def test_store_with_missing_bucket_fails_at_open(tmp_path: Path, s3_env: str) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        Store(tmp_path, object_store="s3://maestro-missing-bucket/x")
