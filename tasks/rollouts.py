"""collect_rollouts (one chunk of items per task run; writes a shard, never the DuckDB file)
and load_shards (the one writer that ingests a run's shards into DuckDB). The chunk logic is
maestro_core.rollouts."""

from __future__ import annotations

from typing import Any

from prefect import task

from maestro_core.rollouts import ChunkSpec, run_chunk
from maestro_core.store import Store
from tasks.retry import RETRY


@task(name="collect_rollouts", task_run_name="collect-{spec.run_id}-it{spec.iteration}-c{spec.chunk}", **RETRY)
def collect_rollouts(spec: ChunkSpec) -> dict[str, Any]:
    """One chunk: run its episodes and write its shard; idempotent by (run, iteration, chunk)."""
    return run_chunk(spec)


@task(name="load_shards", **RETRY)
def load_shards(run_id: str, iteration: int | None = None, home: str | None = None,
                object_store: str | None = None) -> dict[str, Any]:
    """Ingest the run's (or iteration's) shards into the store's DuckDB file: the one writer."""
    with Store(home, object_store=object_store) as store:
        keys = store.load_shards(run_id, iteration)
        n = store.count_episodes(run_id, iteration)
        return {"keys": keys, "uris": [store.objects.uri(k) for k in keys], "episodes": n}
