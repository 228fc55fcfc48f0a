"""`maestro train` = the train-orchestrator Prefect flow (ephemeral API) on a tiny configuration:
dataset -> warm-up -> rollout chunks -> ingest -> rl_update -> checkpoints -> test evaluation;
then kill -9 during rollouts and rerun: exactly the trajectory count of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from maestro_core.store import Store
from tests.pipeline_helpers import write_registry, write_train_config

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS, ITEMS_PER_IT, GROUP = 3, 4, 4


def _config(tmp_path: Path, iterations: int = ITERATIONS) -> Path:
    return write_train_config(tmp_path / "train.yaml", write_registry(tmp_path / "tiny.yaml"), iterations=iterations,
                              items_per_iteration=ITEMS_PER_IT, group=GROUP)


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def _train(tmp_path: Path, home: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "train", "--config",
                             str(_config(tmp_path)), *extra], cwd=ROOT, env=_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _episodes(home: Path) -> tuple[int, list[str]]:
    with Store(home) as store:
        runs = [r["run_id"] for r in store.runs("train")]
        return store.count_episodes(runs[-1]), runs


@pytest.mark.slow
def test_maestro_train_runs_the_flow_and_evaluates(tmp_path):
    home = tmp_path / "home"
    p = _train(tmp_path, home)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    assert "for flow 'train-orchestrator'" in out and "Task run 'rl-update-" in out  # Prefect ran flow and tasks
    n, runs = _episodes(home)
    assert len(runs) == 1 and n == ITERATIONS * ITEMS_PER_IT * GROUP
    with Store(home) as store:
        assert store.run(runs[0])["status"] == "completed"
    run_dir = home / "runs" / runs[0]
    assert (run_dir / "curve.png").exists() and len(json.loads((run_dir / "curve.json").read_text())) == ITERATIONS
    # kept: ckpt-0 (untrained), the validated ckpt-2 and the final ckpt-3
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-0", "ckpt-2", "ckpt-3"]
    evals = sorted((home / "reports").glob("train-*/metrics.json"))
    m = json.loads(evals[-1].read_text())
    assert {"policy", "policy_untrained"} <= set(m["systems"]) and m["split"] == "test"
    assert (evals[-1].parent / "pareto.png").exists()
    listing = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "runs"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith(runs[0]))
    assert "completed" in line and "ckpt-2 (val" in line and "ckpt-3" in line
    assert "policy" in next(x for x in listing.stdout.splitlines() if x.startswith(m["run_id"]))
    # one question of the user's through the trained orchestrator, then its trace
    cmd = [sys.executable, "-m", "flows.cli", "--home", str(home)]
    asked = subprocess.run(cmd + ["ask", "What is 17 * 23?", "--registry", str(tmp_path / "tiny.yaml"),
                                  "--checkpoint", "best"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr
    assert "route:" in asked.stdout and "total: $" in asked.stdout
    episode = asked.stdout.split("maestro trace ")[1].split()[0]
    traced = subprocess.run(cmd + ["trace", episode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert traced.returncode == 0 and episode in traced.stdout, traced.stderr
    # a budget that pays for no call: the grammar offers only the answer
    broke = subprocess.run(cmd + ["ask", "What is 17 * 23?", "--registry", str(tmp_path / "tiny.yaml"),
                                  "--budget", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert broke.returncode == 0, broke.stderr
    assert "0 expert call(s)" in broke.stdout and "1. answer:" in broke.stdout


@pytest.mark.slow
def test_kill_during_rollouts_then_rerun_gives_the_uninterrupted_count(tmp_path):
    home = tmp_path / "home"
    p = _train(tmp_path, home, "--no-eval", start_new_session=True)
    shard_dir = home / "objects" / "trajectories"
    deadline = time.monotonic() + 600
    # kill -9 once iteration 1 has some but not all of its chunks (its shards appear one by one)
    while time.monotonic() < deadline and p.poll() is None:
        it1 = list(shard_dir.glob("run=*/iteration=000001/chunk=*.parquet"))
        if 1 <= len(it1) < ITEMS_PER_IT:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    partial = len(list(shard_dir.glob("run=*/iteration=000001/chunk=*.parquet")))
    assert partial < ITEMS_PER_IT
    p2 = _train(tmp_path, home, "--no-eval")
    out, _ = p2.communicate(timeout=900)
    assert p2.returncode == 0, out[-4000:]
    assert "resuming run" in out
    n, runs = _episodes(home)
    assert len(runs) == 1 and n == ITERATIONS * ITEMS_PER_IT * GROUP  # no duplicated or lost trajectories
    with Store(home) as store:
        trajs = store.trajectories(runs[0])
        assert store.run(runs[0])["status"] == "completed"
    keys = [(t.iteration, t.item_id, t.sample_index) for t in trajs]
    assert len(keys) == len(set(keys))
