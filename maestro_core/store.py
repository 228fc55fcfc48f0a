"""The store: one DuckDB file of runs, registries, trajectories, the expert-call cache and
evaluation results, next to an object store that holds the trajectory shards.

    with Store() as st:                                  # home: arg, else $MAESTRO_HOME, else ./.maestro
        st.record_registry(reg)
        st.record_run("r1", "grpo", {"lr": 1e-6}, reg.version)
        st.write_and_ingest(trajectories, "r1", iteration=0, chunk=0)
        st.load_shards("r1")                             # shards other processes wrote
        st.trajectories("r1", iteration=0)               # -> list[Trajectory]
        st.episodes("r1")                                # -> pyarrow.Table, one row per episode

Layout: `<home>/maestro.duckdb` and, unless `object_store` names another location (a folder or
s3://bucket/prefix), the local object store `<home>/objects`. An S3 object store spools the
writes it cannot take during an outage to `<home>/spool/<bucket>/<prefix>` and uploads them when
the server is back (objectstore.SpoolingObjectStore); close() tries once to upload what is left.

One writer: DuckDB lets only ONE process open the file for writing (it holds a file lock while
open). Only the orchestrating process opens a Store; workers in other processes (Prefect task
runners, GPU rollout workers) write shards to the object store with `shards.write_shard`, and
the store's owner ingests them with `load_shards`. A second process that opens the file gets a
StorageError saying so. Inside one process a Store may be shared between threads (calls are
serialised by a lock).

Idempotence: the trajectories of one (run, iteration, chunk) are replaced as a unit in one
transaction, so a retried chunk replaces its first attempt (even a smaller one) and never
duplicates it. Episode ids are deterministic (trajectory.episode_id), so an episode ingested
again under another chunk moves there instead of being duplicated.

Schema: the `meta` table records SCHEMA_VERSION; a file of another version is refused with
SchemaMismatch. Change a table below -> bump SCHEMA_VERSION. Times are unix seconds (DOUBLE),
like Trajectory.created_at.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from maestro_core.home import resolve_home
from maestro_core.errors import SchemaMismatch, StorageError
from maestro_core.objectstore import ObjectStore, open_object_store
from maestro_core.shards import (as_trajectory_table, check_chunk, check_run_id, list_shards,
                                 parse_shard_key, read_shard, write_shard)
from maestro_core.trajectory import STEP_SCHEMA, TRAJECTORY_SCHEMA, Trajectory, from_arrow

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_FILENAME = "maestro.duckdb"

# ---------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------

_SQL_TYPES = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE",
              pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN", pa.int8(): "TINYINT"}


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _sql_type(t.value_type) + "[]"
    return _SQL_TYPES[t]


# episodes and steps follow the trajectory schemas, so they cannot drift apart from them
EPISODE_SCALARS = [f for f in TRAJECTORY_SCHEMA if f.name != "steps"]
EPISODE_DERIVED = [pa.field("completion_ids", pa.list_(pa.int32())), pa.field("env_mask", pa.list_(pa.int8())),
                   pa.field("logprobs", pa.list_(pa.float32()))]
"""Per episode, policy and observation tokens interleaved as in context (Trajectory.completion_ids),
1/0 per token (env_mask) and sampling logprobs with 0.0 at observation tokens."""
STEP_FIELDS = list(STEP_SCHEMA)

_EPISODES_DDL = ("CREATE TABLE episodes (" + ", ".join(
    f"{f.name} {_sql_type(f.type)}" + (" PRIMARY KEY" if f.name == "episode_id" else "")
    for f in EPISODE_SCALARS + EPISODE_DERIVED) + ")")
_STEPS_DDL = ("CREATE TABLE steps (episode_id VARCHAR NOT NULL, " + ", ".join(
    f"{f.name} {_sql_type(f.type)}" for f in STEP_FIELDS) + ", PRIMARY KEY (episode_id, turn))")

_DDL = [
    "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, created_at DOUBLE, kind VARCHAR NOT NULL,
       config JSON, registry_version VARCHAR, status VARCHAR, updated_at DOUBLE)""",
    """CREATE TABLE registry_versions (version VARCHAR PRIMARY KEY, name VARCHAR, tag VARCHAR,
       source VARCHAR, content JSON, created_at DOUBLE)""",
    """CREATE TABLE expert_stats (registry_version VARCHAR NOT NULL, expert VARCHAR NOT NULL,
       latency_p50_s DOUBLE, latency_p95_s DOUBLE, tokens_in_mean DOUBLE, tokens_out_mean DOUBLE,
       cost_per_call DOUBLE, n BIGINT, measured_at DOUBLE, PRIMARY KEY (registry_version, expert))""",
    _EPISODES_DDL,
    _STEPS_DDL,
    """CREATE TABLE expert_cache (key VARCHAR PRIMARY KEY, expert VARCHAR NOT NULL, skill VARCHAR,
       solver VARCHAR, text VARCHAR, confidence DOUBLE, cost DOUBLE, latency_s DOUBLE, tokens_in BIGINT,
       tokens_out BIGINT, expert_calls INTEGER, created_at DOUBLE)""",
    """CREATE TABLE eval_results (run_id VARCHAR NOT NULL, system VARCHAR NOT NULL, split VARCHAR NOT NULL,
       benchmark VARCHAR NOT NULL, metrics JSON, created_at DOUBLE,
       PRIMARY KEY (run_id, system, split, benchmark))""",
    """CREATE TABLE quarantine (source VARCHAR NOT NULL, item_id VARCHAR NOT NULL, reason VARCHAR,
       created_at DOUBLE, PRIMARY KEY (source, item_id))""",
]
TABLES = ("meta", "runs", "registry_versions", "expert_stats", "episodes", "steps", "expert_cache",
          "eval_results", "quarantine")

CACHE_SCHEMA = pa.schema([
    ("key", pa.string()), ("expert", pa.string()), ("skill", pa.string()), ("solver", pa.string()),
    ("text", pa.string()), ("confidence", pa.float64()), ("cost", pa.float64()), ("latency_s", pa.float64()),
    ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("expert_calls", pa.int32()),
    ("created_at", pa.float64()),
])

# SQL fragments built from the constant column lists above (never from user values)
_EP_SCALAR_COLS = ", ".join(f.name for f in EPISODE_SCALARS)
_STEP_COLS = ", ".join(f.name for f in STEP_FIELDS)
_INGEST_EPISODES = f"""
INSERT INTO episodes ({_EP_SCALAR_COLS}, completion_ids, env_mask, logprobs)
SELECT {_EP_SCALAR_COLS},
       flatten(list_transform(steps, lambda s: s.completion_ids || s.observation_ids)),
       flatten(list_transform(steps, lambda s: list_transform(s.completion_ids, lambda x: 1::TINYINT)
                                             || list_transform(s.observation_ids, lambda x: 0::TINYINT))),
       flatten(list_transform(steps, lambda s: s.logprobs || list_transform(s.observation_ids, lambda x: 0.0::FLOAT)))
FROM {{src}}"""
_INGEST_STEPS = f"""
INSERT INTO steps (episode_id, {_STEP_COLS})
SELECT episode_id, {", ".join(f"s.{f.name}" for f in STEP_FIELDS)}
FROM (SELECT episode_id, unnest(steps) AS s FROM {{src}})"""
_STEPS_AGG = ("list(struct_pack(" + ", ".join(f"{f.name} := {f.name}" for f in STEP_FIELDS)
              + ") ORDER BY turn)")
_EPISODE_ORDER = "ORDER BY iteration, chunk, item_id, sample_index, episode_id"


def _arrow(relation: Any) -> pa.Table:
    # a relation converts without the extra copy a DB-API result makes; newer DuckDB names
    # the method to_arrow_table, older releases arrow
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def _where(**filters: Any) -> tuple[str, list[Any]]:
    """' WHERE a = ? AND b = ?' for the filters that are not None (column names are ours)."""
    cols = [c for c, v in filters.items() if v is not None]
    if not cols:
        return "", []
    return " WHERE " + " AND ".join(f"{c} = ?" for c in cols), [filters[c] for c in cols]




# ---------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------

class Store:
    """The DuckDB store of one Maestro home. Open once per process; close() or use `with`."""

    def __init__(self, home: Path | str | None = None, object_store: str | Path | ObjectStore | None = None):
        self.home = resolve_home(home)
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the Maestro home {self.home}: {e}. Fix: pass a writable "
                               "folder as home or set MAESTRO_HOME.") from e
        self.db_path = self.home / DB_FILENAME
        # an S3 store spools the shards it cannot take during an outage under <home>/spool
        self.objects: ObjectStore = open_object_store(object_store if object_store is not None
                                                      else self.home / "objects", spool=self.home / "spool")
        self._lock = threading.RLock()
        self._cache_writes = 0  # cache_put_many calls so far: tells an ExpertCache its key set is stale
        self._con: duckdb.DuckDBPyConnection | None = self._connect()
        try:
            self._init_schema()
        except BaseException:
            self.close()  # release the file lock before the error leaves
            raise

    # -- opening --------------------------------------------------------------------------
    def _connect(self) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.db_path))
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StorageError(
                    f"the store {self.db_path} is open in another process ({e}). DuckDB allows one "
                    "writing process per file. Fix: close that process (or wait for it to finish); "
                    "workers in other processes must not open the Store: they write shards with "
                    "maestro_core.shards.write_shard and the store's owner runs Store.load_shards; "
                    "or use another home (MAESTRO_HOME) for an independent run.") from e
            raise StorageError(f"cannot open the store {self.db_path}: {e}. Fix: check that it is a "
                               "DuckDB file this DuckDB version can read, or move it aside.") from e
        except duckdb.Error as e:
            raise StorageError(f"cannot open the store {self.db_path}: {e}.") from e

    def _init_schema(self) -> None:
        con = self._conn()
        existing = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main'").fetchall()}
        if "meta" in existing:
            # fetchall, not fetchone: DuckDB 2 refuses new work while a result is half read
            rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
            found = rows[0][0] if rows else None
            if found != str(SCHEMA_VERSION):
                raise self._mismatch(found)
            return
        if existing:
            raise self._mismatch(None)
        with self._transaction():
            for ddl in _DDL:
                con.execute(ddl)
            con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_at', ?)",
                        [str(SCHEMA_VERSION), str(time.time())])

    def _mismatch(self, found: str | None) -> SchemaMismatch:
        what = f"schema version {found}" if found is not None else "no Maestro schema version"
        return SchemaMismatch(
            f"the store {self.db_path} has {what}, but this Maestro needs schema version {SCHEMA_VERSION}. "
            f"Fix: move the old home aside (mv {self.home} {self.home}.old) or run with a new "
            "MAESTRO_HOME; runs in the old file are read with the Maestro version that wrote them.")

    # -- plumbing -------------------------------------------------------------------------
    def _conn(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise StorageError(f"the store {self.db_path} is closed. Fix: open a new Store.")
        return self._con

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            con = self._conn()
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @contextmanager
    def _registered(self, con: duckdb.DuckDBPyConnection, table: pa.Table) -> Iterator[str]:
        """Expose an Arrow table to SQL under a fresh name (no copy; DuckDB scans it in place)."""
        name = f"_arrow_{uuid.uuid4().hex}"
        con.register(name, table)
        try:
            yield name
        finally:
            con.unregister(name)

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        with self._lock:
            try:
                rel = self._conn().sql(sql, params=list(params) or None)
                return pa.table({}) if rel is None else _arrow(rel)  # None: a statement without rows
            except duckdb.Error as e:
                raise StorageError(f"query on {self.db_path} failed: {e}") from e

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._fetch(sql, params).to_pylist()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock:
            try:
                self._conn().execute(sql, list(params))
            except duckdb.Error as e:
                raise StorageError(f"statement on {self.db_path} failed: {e}") from e

    def query(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """Any SQL (with ? parameters) against the store, as Arrow. For analysis and reports:
        write through the methods above, which keep episodes and steps consistent."""
        return self._fetch(sql, params)

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
            try:
                self.objects.close()  # a spool tries once to upload what it holds
            except StorageError as e:
                log.warning("closing the object store %s: %s", self.objects.uri(), e)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r}, objects={self.objects!r})"

    # -- registries and runs --------------------------------------------------------------
    def record_registry(self, registry: Any) -> bool:
        """Record a Registry (anything with version, name, tag, source, to_dict()). Recording a
        version again changes nothing. Returns True when this version was new."""
        content = json.dumps(registry.to_dict(), sort_keys=True)
        with self._lock:
            if self._rows("SELECT 1 FROM registry_versions WHERE version = ?", [registry.version]):
                return False
            self._execute("INSERT INTO registry_versions VALUES (?, ?, ?, ?, ?, ?)",
                          [registry.version, registry.name, registry.tag, registry.source, content, time.time()])
        return True

    def registry_content(self, version: str) -> dict | None:
        """The normalised registry of a recorded version, or None."""
        rows = self._rows("SELECT content FROM registry_versions WHERE version = ?", [version])
        return json.loads(rows[0]["content"]) if rows else None

    def registries(self) -> list[dict[str, Any]]:
        """Recorded registry versions (without content), oldest first."""
        return self._rows("SELECT version, name, tag, source, created_at FROM registry_versions ORDER BY created_at")

    def record_run(self, run_id: str, kind: str, config: Mapping[str, Any], registry_version: str | None = None,
                   status: str = "created") -> None:
        """Create the run, or update kind/config/registry/status of an existing one (a resumed
        run); created_at is kept."""
        check_run_id(run_id)
        now = time.time()
        self._execute(
            """INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET
               kind = excluded.kind, config = excluded.config, registry_version = excluded.registry_version,
               status = excluded.status, updated_at = excluded.updated_at""",
            [run_id, now, kind, _json(config, "config"), registry_version, status, now])

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._lock:
            if not self._rows("SELECT 1 FROM runs WHERE run_id = ?", [run_id]):
                raise StorageError(f"no run '{run_id}' in {self.db_path}. Fix: record_run() it first.")
            self._execute("UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?",
                          [status, time.time(), run_id])

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return _decode(rows[0], "config") if rows else None

    def runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        where, params = _where(kind=kind)
        return [_decode(r, "config") for r in self._rows(f"SELECT * FROM runs{where} ORDER BY created_at", params)]

    # -- expert measurements --------------------------------------------------------------
    def record_expert_stats(self, registry_version: str, expert: str, *, latency_p50_s: float,
                            latency_p95_s: float, tokens_in_mean: float, tokens_out_mean: float,
                            cost_per_call: float, n: int, measured_at: float | None = None) -> None:
        """Store (or replace) the measurement of one expert under one registry version."""
        self._execute(
            "INSERT OR REPLACE INTO expert_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [registry_version, expert, latency_p50_s, latency_p95_s, tokens_in_mean, tokens_out_mean,
             cost_per_call, n, time.time() if measured_at is None else measured_at])

    def expert_stats(self, registry_version: str) -> dict[str, dict[str, Any]]:
        """expert -> its measurement row, for one registry version."""
        rows = self._rows("SELECT * FROM expert_stats WHERE registry_version = ? ORDER BY expert",
                          [registry_version])
        return {r["expert"]: r for r in rows}

    # -- trajectories ---------------------------------------------------------------------
    def ingest_trajectories(self, trajectories: Sequence[Trajectory] | pa.Table, run_id: str, iteration: int,
                            chunk: int) -> int:
        """Replace the episodes and steps of (run_id, iteration, chunk) with these, in one
        transaction; returns the number of episodes. Every trajectory must carry this run_id,
        iteration and chunk."""
        table = as_trajectory_table(trajectories)
        check_run_id(run_id)
        check_chunk(table, run_id, iteration, chunk)
        if len(set(table["episode_id"].to_pylist())) != table.num_rows:
            raise StorageError(f"chunk (run {run_id!r}, iteration {iteration}, chunk {chunk}) holds the "
                               "same episode_id twice. Fix: give every episode of a chunk its own "
                               "(item_id, sample_index).")
        with self._lock:
            con = self._conn()
            with self._registered(con, table) as src:
                try:
                    with self._transaction():
                        # steps first: they are found through the episodes about to be deleted
                        old = (f"SELECT episode_id FROM episodes WHERE run_id = ? AND iteration = ? AND chunk = ? "
                               f"UNION SELECT episode_id FROM {src}")
                        params = [run_id, iteration, chunk]
                        # a first ingest (the common case) has nothing to replace: skip the deletes
                        stale = con.execute(
                            f"SELECT 1 FROM episodes WHERE (run_id = ? AND iteration = ? AND chunk = ?) "
                            f"OR episode_id IN (SELECT episode_id FROM {src}) LIMIT 1", params).fetchone()
                        if stale:
                            con.execute(f"DELETE FROM steps WHERE episode_id IN ({old})", params)
                            con.execute(f"DELETE FROM episodes WHERE episode_id IN ({old})", params)
                        con.execute(_INGEST_EPISODES.format(src=src))
                        con.execute(_INGEST_STEPS.format(src=src))
                except duckdb.Error as e:
                    raise StorageError(f"ingesting run {run_id!r} iteration {iteration} chunk {chunk} into "
                                       f"{self.db_path} failed (nothing was changed): {e}") from e
        return table.num_rows

    def write_and_ingest(self, trajectories: Sequence[Trajectory] | pa.Table, run_id: str, iteration: int,
                         chunk: int) -> str:
        """Write the chunk's shard to the object store (the durable copy), then ingest it.
        Returns the shard key."""
        table = as_trajectory_table(trajectories)
        key = write_shard(self.objects, table, run_id, iteration, chunk)
        self.ingest_trajectories(table, run_id, iteration, chunk)
        return key

    def load_shards(self, run_id: str, iteration: int | None = None) -> list[str]:
        """Ingest every shard of the run (or one iteration) from the object store: how work
        done in other processes enters the DuckDB file. Loading again is harmless (each
        chunk replaces itself). Returns the keys loaded."""
        keys = list_shards(self.objects, run_id, iteration)
        for key in keys:
            run, it, chunk = parse_shard_key(key)
            table = read_shard(self.objects, key)
            try:
                self.ingest_trajectories(table, run, it, chunk)
            except ValueError as e:
                raise StorageError(f"shard {self.objects.uri(key)} does not match its key: {e}") from e
        return keys

    def episodes(self, run_id: str | None = None, iteration: int | None = None) -> pa.Table:
        """One row per episode: the trajectory's scalars plus prompt_ids, completion_ids,
        env_mask and logprobs."""
        where, params = _where(run_id=run_id, iteration=iteration)
        return self._fetch(f"SELECT * FROM episodes{where} {_EPISODE_ORDER}", params)

    def steps(self, episode_id: str) -> pa.Table:
        return self._fetch("SELECT * FROM steps WHERE episode_id = ? ORDER BY turn", [episode_id])

    def trajectories_table(self, run_id: str, iteration: int | None = None) -> pa.Table:
        """The run's trajectories rebuilt from rows, as an Arrow table in TRAJECTORY_SCHEMA."""
        where, params = _where(run_id=run_id, iteration=iteration)
        cols = ", ".join(f"e.{n}" if n != "steps" else "coalesce(s.steps, []) AS steps"
                         for n in TRAJECTORY_SCHEMA.names)
        sql = f"""
            WITH e AS (SELECT * FROM episodes{where}),
                 s AS (SELECT episode_id, {_STEPS_AGG} AS steps FROM steps
                       WHERE episode_id IN (SELECT episode_id FROM e) GROUP BY episode_id)
            SELECT {cols} FROM e LEFT JOIN s USING (episode_id) {_EPISODE_ORDER}"""
        return self._fetch(sql, params).cast(TRAJECTORY_SCHEMA)

    def trajectories(self, run_id: str, iteration: int | None = None) -> list[Trajectory]:
        """Trajectory objects, ordered by iteration, chunk, item_id, sample_index."""
        return from_arrow(self.trajectories_table(run_id, iteration))

    def delete_episodes(self, run_id: str) -> int:
        """Delete a run's episodes and their steps (one transaction); returns how many episodes.
        For a run started over (`maestro train --run-id R --fresh`)."""
        check_run_id(run_id)
        n = self.count_episodes(run_id)
        if n:
            with self._transaction() as con:
                con.execute("DELETE FROM steps WHERE episode_id IN (SELECT episode_id FROM episodes WHERE run_id = ?)",
                            [run_id])
                con.execute("DELETE FROM episodes WHERE run_id = ?", [run_id])
        return n

    def count_episodes(self, run_id: str | None = None, iteration: int | None = None,
                       chunk: int | None = None) -> int:
        where, params = _where(run_id=run_id, iteration=iteration, chunk=chunk)
        return self._fetch(f"SELECT count(*) AS n FROM episodes{where}", params)["n"][0].as_py()

    def count_steps(self, run_id: str | None = None, iteration: int | None = None) -> int:
        where, params = _where(run_id=run_id, iteration=iteration)
        if not where:
            return self._fetch("SELECT count(*) AS n FROM steps")["n"][0].as_py()
        return self._fetch(f"SELECT count(*) AS n FROM steps WHERE episode_id IN "
                           f"(SELECT episode_id FROM episodes{where})", params)["n"][0].as_py()

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t: self._fetch(f"SELECT count(*) AS n FROM {t}")["n"][0].as_py() for t in TABLES}

    # -- expert-call cache ----------------------------------------------------------------
    def cache_get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """key -> cached row, for the keys that are cached."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        rows = self._rows("SELECT * FROM expert_cache WHERE key IN (SELECT unnest(?::VARCHAR[]))", [keys])
        return {r["key"]: r for r in rows}

    @property
    def cache_generation(self) -> int:
        """Changes whenever cache rows are written through this store (`cache_put_many`)."""
        return self._cache_writes

    def cache_keys(self) -> tuple[set[str], int]:
        """Every cached key, and the `cache_generation` they are as of (read before the query,
        so a write during it shows as a newer generation)."""
        with self._lock:
            generation = self._cache_writes
            keys = self._fetch("SELECT key FROM expert_cache")
        return set(keys["key"].to_pylist()), generation

    def cache_put_many(self, rows: Iterable[Mapping[str, Any]], *, replace: bool = False) -> None:
        """Insert cache rows (columns of CACHE_SCHEMA; key and expert required). An existing key
        is kept (the first answer wins: its cost and latency are the ones really paid) unless
        `replace`."""
        latest: dict[str, dict[str, Any]] = {}
        now = time.time()
        for r in rows:
            unknown = set(r) - set(CACHE_SCHEMA.names)
            if unknown or not r.get("key") or not r.get("expert"):
                raise ValueError(f"bad cache row {dict(r)!r}: needs 'key' and 'expert'; allowed columns "
                                 f"are {CACHE_SCHEMA.names}")
            row = {n: r.get(n) for n in CACHE_SCHEMA.names}
            row["created_at"] = now if row["created_at"] is None else row["created_at"]
            if replace or row["key"] not in latest:  # one row per key: DuckDB refuses a key twice per statement
                latest[row["key"]] = row
        if not latest:
            return
        table = pa.Table.from_pylist(list(latest.values()), schema=CACHE_SCHEMA)
        cols = ", ".join(CACHE_SCHEMA.names)
        verb = "INSERT OR REPLACE INTO" if replace else "INSERT OR IGNORE INTO"
        with self._lock:
            con = self._conn()
            with self._registered(con, table) as src:
                self._execute(f"{verb} expert_cache ({cols}) SELECT {cols} FROM {src}")
            self._cache_writes += 1

    # -- evaluation and quarantine --------------------------------------------------------
    def record_eval(self, run_id: str, system: str, split: str, benchmark: str, metrics: Mapping[str, Any]) -> None:
        """Store (or replace, on a rerun) the metrics of one system on one split of a benchmark."""
        self._execute("INSERT OR REPLACE INTO eval_results VALUES (?, ?, ?, ?, ?, ?)",
                      [run_id, system, split, benchmark, _json(metrics, "metrics"), time.time()])

    def eval_results(self, run_id: str | None = None) -> list[dict[str, Any]]:
        where, params = _where(run_id=run_id)
        rows = self._rows(f"SELECT * FROM eval_results{where} ORDER BY run_id, system, split, benchmark", params)
        return [_decode(r, "metrics") for r in rows]

    def record_quarantine(self, source: str, item_id: str, reason: str) -> None:
        """Set an item aside (a dataset row that cannot be used), with the reason."""
        self._execute("INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?, ?)", [source, item_id, reason, time.time()])

    def quarantined(self, source: str | None = None) -> list[dict[str, Any]]:
        where, params = _where(source=source)
        return self._rows(f"SELECT * FROM quarantine{where} ORDER BY source, item_id", params)


def _json(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


def _decode(row: dict[str, Any], col: str) -> dict[str, Any]:
    if row.get(col) is not None:
        row[col] = json.loads(row[col])
    return row
