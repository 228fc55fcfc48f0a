"""Training tasks: open (or resume) a run, collect one rollout chunk, ingest an iteration's
shards, the GRPO update (`rl_update`), finish. Each a few lines over maestro_core.training.

The run object (the learner's weights and optimizer state) lives in the flow's process, so
these tasks take it as an argument and are never cached (NO_CACHE); a chunk given only its
spec (no run) can run in any process (a Dask worker) and writes only its shard.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from maestro_core.rollouts import ChunkSpec, run_chunk
from maestro_core.training import TrainingRun
from tasks.retry import RETRY
from tasks.run_log import run_log


@task(name="open_training_run", cache_policy=NO_CACHE)
def open_training_run(registry, train_items, val_items, *, store, experts, config, out_dir, run_id: str,
                      data_version: str, registry_path: str | None, policy=None) -> TrainingRun:
    """A new run (tokenizer, policy from a config, label-free LM pretraining, ckpt-0; or, with a
    served `policy` section, the learner loaded from its checkpoint) or the run resumed from its
    latest checkpoint."""
    get_run_logger().info(f"opening training run {run_id} in {out_dir}")
    return TrainingRun(registry, train_items, val_items, store=store, experts=experts, config=config,
                       out_dir=out_dir, run_id=run_id, data_version=data_version, registry_path=registry_path,
                       log=run_log, policy=policy)


@task(name="collect_chunk", task_run_name="collect-{spec.run_id}-it{spec.iteration}-c{spec.chunk}",
      cache_policy=NO_CACHE, **RETRY)
def collect_chunk(spec: ChunkSpec, run: TrainingRun | None = None) -> dict[str, Any]:
    """One rollout chunk -> its shard; skipped when its shard exists (a rerun after a crash).
    With `run` (same process) it shares the run's experts and persistent expert cache."""
    if run is None:
        return run_chunk(spec, skip_existing=True)
    return run.collect_chunk(spec)


@task(name="ingest_iteration", cache_policy=NO_CACHE, **RETRY)
def ingest_iteration(run: TrainingRun, iteration: int) -> int:
    """The one writer: the iteration's shards -> DuckDB. Returns the episode count."""
    return run.ingest(iteration)


@task(name="rl_update", task_run_name="rl-update-{run.run_id}-it{iteration}", cache_policy=NO_CACHE)
def rl_update(run: TrainingRun, iteration: int) -> dict[str, Any]:
    """GRPO step from the iteration's stored episodes -> checkpoint iteration+1 (validated every
    eval_every iterations). Not retried in place: a failed update reruns with the flow, which
    resumes from the last checkpoint."""
    return run.update(iteration)


@task(name="finish_training", cache_policy=NO_CACHE)
def finish_training(run: TrainingRun) -> dict[str, Any]:
    res = run.finish()
    return {"run_id": res.run_id, "checkpoints": res.checkpoints, "best_checkpoint": res.best_checkpoint,
            "best_val_accuracy": res.best_val_accuracy, "curve": res.curve,
            "out_dir": str(run.out_dir), "curve_png": str(run.out_dir / "curve.png")}
