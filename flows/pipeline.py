"""The pipeline's flows: they only compose tasks (tasks/ -> maestro_core).

    train_orchestrator(config_path=None, iterations=None, run_id=None, fresh=False, runner="local")
    evaluate_orchestrator(config_path=None, split="test", data=None, registry=None, out=None)
    collect_and_store(run_id, policy_spec, data=None, split="train", ..., runner="local" | "dask")
    retrain_on_registry_update(registry_path, version)     # started by `maestro.registry.updated` (trains)
    publish_registry_flow(path)                             # `maestro registry publish FILE`

Deployments: infra/prefect.yaml.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger

from maestro_core.config import load_config
from maestro_core.home import resolve_home
from tasks import (build_dataset, collect_chunk, collect_rollouts, evaluate, finish_training, ingest_iteration,
                   load_shards, open_training_run, publish_registry, rl_update, warm_up_experts)
from tasks.artifacts import publish_eval_artifacts, publish_training_artifacts
from tasks.dataset import load_items
from tasks.registry import registry_version
from tasks.run_log import run_log
from maestro_core.rollouts import chunk_specs

Runner = Literal["local", "dask"]


def _default_out(home: str | None, prefix: str) -> str:
    return str(resolve_home(home) / "reports" / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def make_task_runner(runner: Runner = "local", *, max_workers: int | None = None, dask_address: str | None = None,
                     dask_workers: int = 2):
    """The task runner rollout chunks fan out on: a thread pool in this process ("local"), or
    prefect-dask's DaskTaskRunner on an existing cluster (`dask_address`) or a LocalCluster of
    `dask_workers` single-threaded worker processes."""
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": dask_workers, "processes": True,
                                              "threads_per_worker": 1, "dashboard_address": None})
    raise ValueError(f"runner must be 'local' or 'dask', got {runner!r}")


@flow(name="train-orchestrator")
def train_orchestrator(config_path: str | None = None, iterations: int | None = None, run_id: str | None = None,
                       fresh: bool = False, home: str | None = None, registry: str | None = None,
                       runner: Runner = "local", dask_address: str | None = None, dask_workers: int = 2,
                       evaluate_test: bool = True, baselines: bool = False, out: str | None = None) -> dict[str, Any]:
    """Dataset -> expert warm-up -> per iteration: rollout chunks (through the task runner) ->
    ingest -> rl_update (-> checkpoint, validation) -> the best checkpoint evaluated on the test
    split (with every baseline when `baselines`). Resumes the newest unfinished run with the
    same config unless `run_id` or `fresh` says otherwise."""
    from maestro_core.config import build
    from maestro_core.experts import build_experts
    from maestro_core.policy_config import PolicyConfig
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.suite import load_suite
    from maestro_core.training import TrainConfig, choose_run, data_version

    cfg = load_config(config_path)
    home = home or cfg.home
    registry_path = registry or cfg.registry
    section = cfg.section("train")
    if iterations is not None:
        section["iterations"] = iterations
    tcfg = build(TrainConfig, section, source=cfg.source, section="train")
    pcfg = build(PolicyConfig, cfg.section("policy"), source=cfg.source, section="policy")
    dataset = build_dataset(cfg.section("suite") or None, home=home)
    warm_up_experts(registry_path, home=home)
    reg = load_registry(registry_path or DEFAULT_REGISTRY)
    with Store(home) as store:
        store.record_registry(reg)
        suite = load_suite(store.home, dataset["version"], object_store=store.objects)
        train = [it for it in suite if it.split == "train"]
        val = [it for it in suite if it.split == "val"]
        run_id, out_dir = choose_run(store, tcfg, run_id, fresh=fresh, registry_version=reg.version, policy=pcfg,
                                     log=run_log)
        run_log(f"training run {run_id}: {tcfg.iterations} iterations x {tcfg.prompts_per_iteration} items x "
                f"{tcfg.grpo.num_generations} episodes; outputs in {out_dir}")
        run = open_training_run(reg, train, val, store=store, experts=build_experts(reg), config=tcfg,
                                out_dir=out_dir, run_id=run_id, data_version=data_version(train + val),
                                registry_path=registry_path, policy=pcfg)
        for it in range(run.start, tcfg.iterations):
            specs = run.chunk_specs(it)
            if runner == "local":  # in this process: the run's experts and persistent cache
                [collect_chunk(spec, run) for spec in specs]
            else:
                with make_task_runner(runner, dask_address=dask_address, dask_workers=dask_workers) as tr:
                    [f.result() for f in tr.map(collect_chunk, {"spec": specs})]
            ingest_iteration(run, it)
            rl_update(run, it)
        result = finish_training(run)
    publish_training_artifacts(result, home=home)
    metrics = None
    if evaluate_test:
        out = out or _default_out(home, f"train-{run_id}")
        metrics = evaluate(out, registry_path=registry_path, home=home, split="test",
                           checkpoint=result["best_checkpoint"] or "latest", baselines=baselines,
                           config=cfg.section("eval"))
        publish_eval_artifacts(metrics, out, home=home, key="maestro-train-eval")
    return {"run_id": run_id, "out_dir": result["out_dir"], "best_checkpoint": result["best_checkpoint"],
            "best_val_accuracy": result["best_val_accuracy"], "curve_png": result["curve_png"],
            "eval_out": out if evaluate_test else None,
            "test": {k: v["accuracy"] for k, v in metrics["systems"].items()} if metrics else None}


@flow(name="evaluate-orchestrator")
def evaluate_orchestrator(config_path: str | None = None, split: str = "test", data: str | None = None,
                          registry: str | None = None, out: str | None = None, home: str | None = None,
                          checkpoint: str = "none") -> dict[str, Any]:
    """Evaluate every baseline and, with `checkpoint` (latest, best, RUN/ckpt-N or a folder),
    the policy beside its untrained self, on the suite's split or a JSONL file; writes
    metrics.json, report.md, results.csv and the plots into `out` and publishes Prefect
    artifacts."""
    cfg = load_config(config_path)
    home = home or cfg.home
    out = out or _default_out(home, "eval")
    metrics = evaluate(out, registry_path=registry or cfg.registry, home=home, split=split, data=data or None,
                       checkpoint=checkpoint, baselines=True, config=cfg.section("eval"))
    publish_eval_artifacts(metrics, out, home=home)
    return {"out": out, "run_id": metrics.get("run_id"), "systems": {k: v["accuracy"] for k, v in metrics["systems"].items()}}


@flow(name="collect-and-store")
def collect_and_store(policy_spec: dict[str, Any], run_id: str | None = None, iteration: int = 0,
                      data: str | None = None, split: str = "train", limit: int | None = None,
                      registry: str | None = None, chunk_size: int = 8, group_size: int = 1,
                      episode: dict[str, Any] | None = None, home: str | None = None,
                      object_store: str | None = None, runner: Runner = "local", dask_address: str | None = None,
                      dask_workers: int = 2) -> dict[str, Any]:
    """Fan rollout chunks out through the task runner (each writes one shard), then load the
    shards into DuckDB in this process (the one writer)."""
    run_id = run_id or f"collect-{time.strftime('%Y%m%d-%H%M%S')}"
    objects = object_store or str(resolve_home(home) / "objects")
    items = load_items(data, split=split, home=home, object_store=object_store, limit=limit)
    specs = chunk_specs(items, run_id=run_id, iteration=iteration, chunk_size=chunk_size, policy_spec=policy_spec,
                        object_store=objects, registry_path=registry, group_size=group_size, episode=episode)
    with make_task_runner(runner, dask_address=dask_address, dask_workers=dask_workers) as task_runner:
        futures = task_runner.map(collect_rollouts, {"spec": specs})
        chunks = [f.result() for f in futures]
    loaded = load_shards(run_id, iteration, home=home, object_store=object_store)
    return {"run_id": run_id, "iteration": iteration, "chunks": chunks, "episodes": loaded["episodes"],
            "shards": loaded["uris"]}


@flow(name="retrain-on-registry-update")
def retrain_on_registry_update(registry_path: str, version: str = "", config_path: str | None = None,
                               home: str | None = None, out: str | None = None,
                               iterations: int | None = None) -> dict[str, Any]:
    """Started by `maestro.registry.updated` (and nightly): train a policy for the registry as
    it is now (train-orchestrator as a subflow: dataset, warm-up, GRPO, then the test split
    with every baseline beside the policy). A new registry version starts a new run; a rerun
    of the same version resumes its run."""
    logger = get_run_logger()
    current = registry_version(registry_path)
    if version and version != current:
        logger.warning(f"{registry_path} is now version {current}, not {version} (changed since the event); "
                       f"using {current}")
    res = train_orchestrator(config_path=config_path, iterations=iterations, home=home, registry=registry_path,
                             baselines=True, out=out or _default_out(home or load_config(config_path).home,
                                                                     f"retrain-{current}"))
    return {"registry_version": current, **res}


@flow(name="publish-registry")
def publish_registry_flow(path: str, home: str | None = None) -> dict[str, Any]:
    """Record a registry version and emit `maestro.registry.updated` (see tasks.registry)."""
    return publish_registry(path, home=home)


