"""Trajectory shards: one Parquet file per (run, iteration, chunk) in the object store.

Rollout workers write their chunk's trajectories here; the process that owns the DuckDB file
ingests them later (`Store.load_shards`). This module needs only pyarrow and an ObjectStore,
never DuckDB, so any process may use it.

    key = write_shard(store, trajectories, run_id="r1", iteration=3, chunk=7)
    # -> "trajectories/run=r1/iteration=000003/chunk=000007.parquet"
    table = read_shard(store, key)                  # pyarrow Table in TRAJECTORY_SCHEMA
    list_shards(store, "r1", iteration=3)           # sorted keys

The key depends only on (run_id, iteration, chunk), so a retried chunk overwrites its shard
(atomically) instead of adding a second one. Integers are zero-padded so that the listing
sorts in numeric order.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maestro_core.errors import StorageError
from maestro_core.objectstore import ObjectStore
from maestro_core.trajectory import TRAJECTORY_SCHEMA, Trajectory, to_arrow

SHARD_ROOT = "trajectories"
_PAD = 6
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY_RE = re.compile(r"^trajectories/run=(?P<run>[A-Za-z0-9][A-Za-z0-9._-]*)/iteration=(?P<it>\d+)"
                     r"/chunk=(?P<chunk>\d+)\.parquet$")


def check_run_id(run_id: str) -> str:
    """A run id becomes a key segment and a folder name: letters, digits, '.', '_', '-'."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run_id {run_id!r}: use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit (e.g. 'grpo-2024-06-01-a').")
    return run_id


def _check_index(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**_PAD:
        raise ValueError(f"{name} must be an int in [0, {10**_PAD}), got {value!r}")
    return value


def shard_prefix(run_id: str, iteration: int | None = None) -> str:
    p = f"{SHARD_ROOT}/run={check_run_id(run_id)}/"
    if iteration is not None:
        p += f"iteration={_check_index('iteration', iteration):0{_PAD}d}/"
    return p


def shard_key(run_id: str, iteration: int, chunk: int) -> str:
    return shard_prefix(run_id, iteration) + f"chunk={_check_index('chunk', chunk):0{_PAD}d}.parquet"


def parse_shard_key(key: str) -> tuple[str, int, int]:
    """'trajectories/run=r/iteration=000001/chunk=000002.parquet' -> ('r', 1, 2)."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"not a trajectory shard key: {key!r}")
    return m["run"], int(m["it"]), int(m["chunk"])


def as_trajectory_table(data: Sequence[Trajectory] | pa.Table) -> pa.Table:
    """Trajectories or an Arrow table -> a table in exactly TRAJECTORY_SCHEMA (column order and
    types), so every shard and every ingest sees one layout."""
    if isinstance(data, pa.Table):
        missing = [n for n in TRAJECTORY_SCHEMA.names if n not in data.column_names]
        if missing:
            raise StorageError(f"trajectory table lacks columns {missing}. Fix: build it with "
                               "maestro_core.trajectory.to_arrow().")
        try:
            return data.select(TRAJECTORY_SCHEMA.names).cast(TRAJECTORY_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise StorageError(f"trajectory table does not match TRAJECTORY_SCHEMA: {e}. Fix: build it "
                               "with maestro_core.trajectory.to_arrow().") from e
    return to_arrow(list(data))


def check_chunk(table: pa.Table, run_id: str, iteration: int, chunk: int) -> None:
    """Every row must belong to the (run, iteration, chunk) it is filed under, or a retried chunk
    could not find (and replace) the rows of its first attempt."""
    for col, want in (("run_id", run_id), ("iteration", iteration), ("chunk", chunk)):
        bad = pc.sum(pc.cast(pc.not_equal(table[col], pa.scalar(want, table.schema.field(col).type)),
                             pa.int64())).as_py()
        nulls = table[col].null_count
        if bad or nulls:
            raise ValueError(f"{(bad or 0) + nulls} trajectories have a {col} other than {want!r}, but are "
                             f"filed under run_id={run_id!r}, iteration={iteration}, chunk={chunk}. "
                             "Fix: pass the run_id/iteration/chunk the trajectories were built with.")


def write_shard(store: ObjectStore, trajectories: Sequence[Trajectory] | pa.Table, run_id: str,
                iteration: int, chunk: int) -> str:
    """Write one chunk's trajectories (possibly none) as Parquet; returns the key. Writing the
    same (run, iteration, chunk) again replaces the shard."""
    key = shard_key(run_id, iteration, chunk)
    table = as_trajectory_table(trajectories)
    check_chunk(table, run_id, iteration, chunk)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put_bytes(key, buf.getvalue())
    return key


def read_shard(store: ObjectStore, key: str) -> pa.Table:
    """The shard's table, in TRAJECTORY_SCHEMA."""
    data = store.get_bytes(key)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise StorageError(f"{store.uri(key)} is not a readable Parquet file: {e}. Fix: delete it and "
                           "rerun the chunk that wrote it.") from e
    return as_trajectory_table(table)


def list_shards(store: ObjectStore, run_id: str, iteration: int | None = None) -> list[str]:
    """Shard keys of a run (or of one iteration), sorted by iteration then chunk."""
    return [k for k in store.list(shard_prefix(run_id, iteration)) if _KEY_RE.match(k)]
