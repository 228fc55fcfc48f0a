"""Prefect's overhead on the training pipeline: the same maestro_core steps (TrainingRun: open,
chunks, ingest, update, finish) run by the `train-orchestrator` flow and tasks against
Prefect's ephemeral API, and by the plain loop `train_policy`, on the same configuration.

    .venv/bin/python benchmarks/prefect_overhead.py [--small]

The configuration is tiny on purpose (in-process python experts, a 64-wide policy, the math
benchmark only): the expert and model work is small, so what remains is the orchestration.
Reported: wall time of each (the flow's from its call to its return, the ephemeral API's
start-up measured apart), the ratio flow / direct, and the overhead per task run.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("DO_NOT_TRACK", "1")

from benchmarks._common import parse_args, write_result  # noqa: E402


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__)
    iterations = 2 if args.small else 6
    from maestro_core.config import build, load_config
    from maestro_core.experts import build_experts
    from maestro_core.registry import load_registry
    from maestro_core.store import Store
    from maestro_core.suite import SuiteConfig, ensure_suite
    from maestro_core.training import TrainConfig, data_version, train_policy
    from tests.pipeline_helpers import write_registry, write_train_config

    tmp = Path(tempfile.mkdtemp(prefix="prefect-overhead-"))
    reg_path = write_registry(tmp / "tiny.yaml")
    cfg_path = write_train_config(tmp / "train.yaml", reg_path, iterations=iterations)
    cfg = load_config(cfg_path)
    tcfg = build(TrainConfig, cfg.section("train"), section="train")
    registry = load_registry(reg_path)

    # direct: the plain loop (suite built once beforehand in each home, outside the timing)
    home_d = tmp / "direct"
    with Store(home_d) as store:
        suite = ensure_suite(store, build(SuiteConfig, cfg.section("suite"), section="suite"))
        train = [it for it in suite if it.split == "train"]
        val = [it for it in suite if it.split == "val"]
        t0 = time.perf_counter()
        train_policy(registry, train, val, store=store, experts=build_experts(registry), config=tcfg,
                     out_dir=home_d / "runs" / "d", run_id="d", data_version=data_version(train + val),
                     log=lambda s: None)
        direct_s = time.perf_counter() - t0

    # the flow: ephemeral API started first (timed apart), then the flow without evaluation
    from prefect.testing.utilities import prefect_test_harness

    home_f = tmp / "flow"
    with Store(home_f) as store:
        ensure_suite(store, build(SuiteConfig, cfg.section("suite"), section="suite"))
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        startup_s = time.perf_counter() - t0
        from flows.pipeline import train_orchestrator
        t1 = time.perf_counter()
        train_orchestrator(config_path=str(cfg_path), run_id="f", home=str(home_f), evaluate_test=False)
        flow_s = time.perf_counter() - t1
    # the flow also builds (finds) the suite and warms the experts up: time those steps directly
    from maestro_core.rollouts import run_sync
    from maestro_core.warmup import warm_up
    t2 = time.perf_counter()
    with Store(home_f) as store:
        ensure_suite(store, build(SuiteConfig, cfg.section("suite"), section="suite"))
        experts = build_experts(registry)
        run_sync(warm_up(registry, experts, store, probes=3))
    stages_s = time.perf_counter() - t2
    n_chunks = iterations * tcfg.prompts_per_iteration
    n_tasks = 2 + 2 + n_chunks + 2 * iterations + 1 + 1  # dataset, warm-up, open, chunks, ingest+update, finish, artifacts
    overhead = flow_s - direct_s - stages_s
    res = {
        "iterations": iterations, "chunks": n_chunks, "task_runs": n_tasks,
        "direct_s": round(direct_s, 2), "flow_s": round(flow_s, 2), "flow_extra_stages_s": round(stages_s, 2),
        "ratio_flow_over_direct": round(flow_s / direct_s, 3),
        "ratio_same_work": round((flow_s - stages_s) / direct_s, 3),
        "overhead_per_task_run_ms": round(1000 * overhead / n_tasks, 1),
        "ephemeral_api_startup_s": round(startup_s, 1),
    }
    print(f"{'':32} seconds")
    for k in ("direct_s", "flow_s", "flow_extra_stages_s", "ephemeral_api_startup_s"):
        print(f"{k:32} {res[k]}")
    print(f"flow / direct (same work): {res['ratio_same_work']}  ({res['overhead_per_task_run_ms']} ms per task run "
          f"over {n_tasks} task runs)")
    write_result("prefect_overhead", args, res, started)


if __name__ == "__main__":
    main()
